"""``python -m trainer.sample checkpoint=<run dir> prompt="a red square moving left"``

Loads the newest intact checkpoint of a run (an early-stopped run's best; or a given
``.../checkpoints/step_N``), with EMA weights by default, samples with the
linear-quadratic Euler schedule and classifier-free guidance (``guidance=cfg``), Adaptive
Guidance (``guidance=adaptive gamma=0.99``: the unconditional pass stops once it agrees
with the conditional one), LinearAG (``guidance=linear_ag``, after calibrating with
``trainer.linear_guidance``) or none, and writes mp4s, printing their paths and the number
of DiT evaluations (NFE) each video cost. Options are ``key=value`` pairs, checked against
``SampleConfig``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from models.sampler import GuidanceTrace
from trainer.config import ConfigError
from trainer.linear_guidance import calibration_path, load_coefficients
from trainer.run_config import parse_cli_options
from trainer.sampling import Guidance, generate_traced, write_videos
from trainer.trained import load_text_to_video


@dataclass
class SampleConfig:
    checkpoint: str = MISSING        # a run dir, one of its checkpoints/step_N, or a
    #                                  safetensors file of trainer.export/trainer.average
    prompt: str = MISSING
    output_dir: str | None = None    # default: <run dir>/samples/cli (or beside the file)
    steps: int = 50
    guidance_scale: float = 7.5
    guidance: Guidance = Guidance.cfg
    gamma: float = 0.99              # guidance=adaptive: the cosine similarity that ends CFG
    seed: int = 0
    num_videos: int = 1              # videos of the prompt, with seeds seed, seed+1, ...
    ema: bool = True
    frames: int | None = None        # default: the run's data.frames (and height, width)
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    device: str = "cpu"


def sample(opts: SampleConfig) -> list[Path]:
    """-> the mp4 paths, one per video."""
    return sample_traced(opts)[0]


def sample_traced(opts: SampleConfig) -> tuple[list[Path], list[GuidanceTrace]]:
    """-> (the mp4 paths, what guidance did for each video)."""
    run = load_text_to_video(Path(opts.checkpoint), torch.device(opts.device), opts.ema,
                             frames=opts.frames, height=opts.height, width=opts.width)
    task = run.task
    linear = None
    if opts.guidance is Guidance.linear_ag:
        linear = load_coefficients(calibration_path(run.run_dir, opts.steps, opts.guidance_scale),
                                   run.model, opts.steps, opts.guidance_scale)
    videos, traces = [], []
    for i in range(opts.num_videos):
        video, trace = generate_traced(run.model, task.autoencoder, [opts.prompt],
                                       task.latent_shape, opts.steps, opts.guidance_scale,
                                       opts.seed + i, opts.guidance, opts.gamma, linear)
        videos.append(video)
        traces.append(trace)
    output_dir = Path(opts.output_dir) if opts.output_dir else run.run_dir / "samples" / "cli"
    paths = write_videos(torch.cat(videos), [opts.prompt] * opts.num_videos, output_dir,
                         opts.fps or run.cfg.data.fps)
    return paths, traces


def main(argv: list[str]) -> None:
    opts = parse_cli_options(SampleConfig, argv, "trainer.sample",
                             'checkpoint=<run dir> prompt="..." [key=value ...]')
    try:
        paths, traces = sample_traced(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    for path, trace in zip(paths, traces, strict=True):
        switch = int(trace.switch_step[0])
        switched = f", conditional only from step {switch}" if switch >= 0 else ""
        print(f"{path.name}: NFE {int(trace.nfe[0])}{switched}", file=sys.stderr)
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
