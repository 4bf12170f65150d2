"""``python -m trainer.sample checkpoint=<run dir> prompt="a red square moving left"``

Loads the newest intact checkpoint of a run (or a given ``.../checkpoints/step_N``), with
EMA weights by default, samples with the linear-quadratic Euler schedule and classifier-
free guidance, and writes one mp4 per prompt. Options are ``key=value`` pairs, checked
against ``SampleConfig``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.build import build_autoencoder, build_model
from trainer.checkpoint import STATE_FILE, Checkpointer
from trainer.config import check_latent_fits
from trainer.ema import EMA
from trainer.run_config import load_run_config
from trainer.sampling import generate, write_videos


@dataclass
class SampleConfig:
    checkpoint: str = MISSING        # a run directory, or one of its checkpoints/step_N
    prompt: str = MISSING
    output_dir: str | None = None    # default: <run dir>/samples/cli
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    num_videos: int = 1              # videos per prompt, seeds seed, seed+1, ...
    ema: bool = True
    frames: int | None = None        # default: the run's data.frames (and height, width)
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    device: str = "cpu"


def locate(checkpoint: Path) -> tuple[Path, dict]:
    """(run dir, checkpoint state) from a run dir or a specific step directory."""
    if (checkpoint / STATE_FILE).is_file():
        problem = Checkpointer.verify(checkpoint)
        if problem:
            raise ValueError(f"checkpoint={checkpoint} is damaged: {problem}")
        return checkpoint.parent.parent, torch.load(checkpoint / STATE_FILE, weights_only=True)
    found = Checkpointer(checkpoint / "checkpoints", keep_last=0).load_latest()
    if found is None:
        raise FileNotFoundError(f"checkpoint={checkpoint} has no intact checkpoint under "
                                f"{checkpoint / 'checkpoints'}")
    return checkpoint, found[1]


def sample(opts: SampleConfig) -> list[Path]:
    run_dir, state = locate(Path(opts.checkpoint))
    cfg = load_run_config(run_dir)
    data = cfg.data
    data.frames = opts.frames or data.frames
    data.height = opts.height or data.height
    data.width = opts.width or data.width
    device = torch.device(opts.device)
    autoencoder = build_autoencoder(cfg, device)
    latent_shape = check_latent_fits(cfg, autoencoder)
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    model.eval()
    if opts.ema:
        ema = EMA(model, cfg.recipe.ema_decay)
        ema.load_state_dict(state["ema"])
        ema.swap()
    prompts = [opts.prompt] * opts.num_videos
    videos = torch.cat([generate(model, autoencoder, [p], latent_shape, opts.steps,
                                 opts.guidance_scale, seed=opts.seed + i)
                        for i, p in enumerate(prompts)])
    output_dir = Path(opts.output_dir) if opts.output_dir else run_dir / "samples" / "cli"
    return write_videos(videos, prompts, output_dir, opts.fps or data.fps)


def main(argv: list[str]) -> None:
    try:
        opts = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleConfig),
                                                   OmegaConf.from_cli(argv)))
    except OmegaConfBaseException as error:
        raise SystemExit(f"trainer.sample: {str(error).splitlines()[0]} "
                         f"(usage: checkpoint=<run dir> prompt=\"...\" [key=value ...])") from None
    for path in sample(opts):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
