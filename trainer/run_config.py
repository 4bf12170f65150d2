"""Recover a finished or running run's validated config from its run directory.

Hydra saved the command-line overrides and the resolved config in ``<run>/.hydra/``, and
every checkpoint carries those of the launch that wrote it (``run_config.json``): the run
directory's are the latest launch's, which may have been refused or may have changed
settings since. The overrides are composed again against today's ``conf/`` (so every node
has its schema), then the saved values are laid over them, so a default changed since
training does not change the model being loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from trainer.config import ConfigError, TrainConfig, register_configs, to_train_config

CONF_DIR = Path(conf.__file__).resolve().parent


# Keys of a weights file's safetensors metadata that carry the run's config (JSON list of
# the command-line overrides; the saved config.yaml as text), so the file alone rebuilds
# the model (``trainer.sample checkpoint=model.safetensors``).
OVERRIDES_KEY, CONFIG_KEY = "hydra_overrides", "hydra_config"


# A checkpoint's copy of the config that trained it: ``run_config_metadata``'s strings.
CHECKPOINT_CONFIG_FILE = "run_config.json"


def write_checkpoint_config(directory: Path, metadata: dict[str, str]) -> Path:
    path = Path(directory) / CHECKPOINT_CONFIG_FILE
    path.write_text(json.dumps(metadata, indent=1))
    return path


def checkpoint_config(step_dir: Path) -> dict[str, str] | None:
    """The config stored with a checkpoint; None for one written before they were."""
    path = Path(step_dir) / CHECKPOINT_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_metadata(run_dir: Path, step_dir: Path) -> dict[str, str]:
    """The config that trained ``step_dir``: its stored copy, else (an older checkpoint)
    the run directory's."""
    return checkpoint_config(step_dir) or run_config_metadata(run_dir)


def run_config_metadata(run_dir: Path) -> dict[str, str]:
    """The run's overrides and saved config as strings for a file's metadata."""
    hydra_dir = Path(run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {hydra_dir}/config.yaml "
                                f"is missing (pass checkpoint=runs/<run_name>)")
    overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))
    return {OVERRIDES_KEY: json.dumps(overrides),
            CONFIG_KEY: (hydra_dir / "config.yaml").read_text()}


def config_from_metadata(metadata: dict[str, str]) -> TrainConfig:
    """Compose the saved overrides against today's ``conf/``, then lay the saved values
    over them (``run_config_metadata``'s strings)."""
    overrides = [o for o in json.loads(metadata[OVERRIDES_KEY]) if not o.startswith("hydra.")]
    register_configs()
    try:
        with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
            composed = compose("train", overrides=overrides)
        merged = OmegaConf.merge(composed, OmegaConf.create(metadata[CONFIG_KEY]))
    except (HydraException, OmegaConfBaseException) as error:
        where = getattr(error, "full_key", None)
        raise ConfigError(f"the saved config does not fit this version's schema"
                          f"{f' at {where}' if where else ''}: "
                          f"{str(error).splitlines()[0]}") from None
    return to_train_config(merged)


def parse_cli_options(schema: type, argv: list[str], command: str, usage: str):
    """``key=value`` arguments checked against a dataclass ``schema``; a bad or missing
    key exits with the problem and the usage line."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                   OmegaConf.from_cli(argv)))
    except OmegaConfBaseException as error:
        raise SystemExit(f"{command}: {str(error).splitlines()[0]} (usage: {usage})") from None
