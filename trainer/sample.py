"""``python -m trainer.sample checkpoint=<run dir> prompt="a red square moving left"``

Loads the newest intact checkpoint of a run (an early-stopped run's best; or a given
``.../checkpoints/step_N``), with EMA weights by default, samples with the
linear-quadratic Euler schedule and classifier-free guidance, and writes mp4s, printing
their paths. Options are ``key=value`` pairs,
checked against ``SampleConfig``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from trainer.config import ConfigError
from trainer.run_config import parse_cli_options
from trainer.sampling import generate, write_videos
from trainer.trained import load_text_to_video


@dataclass
class SampleConfig:
    checkpoint: str = MISSING        # a run dir, one of its checkpoints/step_N, or a
    #                                  safetensors file of trainer.export/trainer.average
    prompt: str = MISSING
    output_dir: str | None = None    # default: <run dir>/samples/cli (or beside the file)
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    num_videos: int = 1              # videos of the prompt, with seeds seed, seed+1, ...
    ema: bool = True
    frames: int | None = None        # default: the run's data.frames (and height, width)
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    device: str = "cpu"


def sample(opts: SampleConfig) -> list[Path]:
    run = load_text_to_video(Path(opts.checkpoint), torch.device(opts.device), opts.ema,
                             frames=opts.frames, height=opts.height, width=opts.width)
    task = run.task
    videos = torch.cat([generate(run.model, task.autoencoder, [opts.prompt], task.latent_shape,
                                 opts.steps, opts.guidance_scale, seed=opts.seed + i)
                        for i in range(opts.num_videos)])
    output_dir = Path(opts.output_dir) if opts.output_dir else run.run_dir / "samples" / "cli"
    return write_videos(videos, [opts.prompt] * opts.num_videos, output_dir,
                        opts.fps or run.cfg.data.fps)


def main(argv: list[str]) -> None:
    opts = parse_cli_options(SampleConfig, argv, "trainer.sample",
                             'checkpoint=<run dir> prompt="..." [key=value ...]')
    try:
        paths = sample(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
