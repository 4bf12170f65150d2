"""What a composed or loaded config may hold, checked before it becomes dataclasses.

Keys: a ``+key=value`` override adds a key to a node with a schema, and turning the config
into dataclasses then drops it without a word (``+model.dept=3`` would train the default
depth). Every key of a node with a schema must be one of its fields.

Targets: Hydra builds a node by calling its ``_target_`` with the node's other fields.
Configs are also read back from files: a run directory's saved config and checkpoint
configs (``trainer.sample``, ``trainer.export``, ``trainer.average``, a resumed run) and a
weights file's metadata. Any importable callable named there would be called
(``os.system``, ``builtins.exec``), so a ``_target_`` must name a class defined in one of
this project's packages; nothing outside them is even imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

PACKAGES = ("models", "data", "parallel", "trainer")


def check_target(target: Any, key: str) -> None:
    """Raise ValueError unless ``target`` names a class defined in ``PACKAGES``."""
    allowed = (f"{key}={target!r} is not a class of this project: a config may only build "
               f"classes defined in its packages ({', '.join(PACKAGES)}); a config read "
               f"from a run directory or weights file that names another was not written by "
               f"this trainer")
    if not isinstance(target, str) or target.split(".", 1)[0] not in PACKAGES:
        raise ValueError(allowed)
    try:
        found = get_class(target)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}={target!r} names no class: "
                         f"{str(error).splitlines()[0]}") from None
    # a re-export (models.dit.torch.nn.Linear) resolves to a class defined elsewhere
    if f"{found.__module__}.{found.__qualname__}" != target:
        raise ValueError(allowed)


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` anywhere in ``cfg`` (lists included)."""
    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                where = f"{key}.{name}" if key else str(name)
                if name == "_target_":
                    check_target(value, where)
                else:
                    visit(value, where)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{key}[{index}]")

    visit(OmegaConf.to_container(cfg, resolve=False), "")


def check_known_keys(cfg: DictConfig, key: str = "") -> None:
    """Raise ValueError for a key of a schema'd node that is not one of its fields."""
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        fields = {field.name for field in dataclasses.fields(schema)}
        for name in cfg.keys():
            if name not in fields:
                where = f"{key}.{name}" if key else str(name)
                raise ValueError(f"{where} is not a setting: {key or 'the config'} has no key "
                                 f"{name!r} (its keys: {', '.join(sorted(fields))}); check "
                                 f"the spelling")
    for name in cfg.keys():
        child = cfg._get_node(name)
        where = f"{key}.{name}" if key else str(name)
        if isinstance(child, DictConfig):
            check_known_keys(child, where)
        elif isinstance(child, ListConfig):
            for index, item in enumerate(child):
                if isinstance(item, DictConfig):
                    check_known_keys(item, f"{where}[{index}]")
