"""``python -m trainer.sample checkpoint=<run dir> prompt="a red square moving left"``

Loads the newest intact checkpoint of a run (an early-stopped run's best; or a given
``.../checkpoints/step_N``), with EMA weights by default, samples with the
linear-quadratic Euler schedule and classifier-free guidance (``guidance=cfg``), Adaptive
Guidance (``guidance=adaptive gamma=0.99``: the unconditional pass stops once it agrees
with the conditional one), LinearAG (``guidance=linear_ag``, after calibrating with
``trainer.linear_guidance``) or none, optionally reusing DiT blocks between steps
(``cache=block|first_block|teacache cache_threshold=...``, ``models.block_cache``; block
after calibrating with ``trainer.block_cache_calibration``), and writes mp4s, printing
their paths and the number of DiT evaluations (NFE) and block evaluations each video
cost. A student of ``task=distill`` samples on the times it was trained on, conditional
only: pass its ``steps`` (another value is refused). Options are ``key=value`` pairs,
checked against ``SampleConfig``.

On a mesh (``launch/torchrun.sh 4 -m trainer.sample ... parallel.tp=2 parallel.cp=2``,
``parallel.cfg_parallel=true``: ``trainer.mesh_sampling``) every rank loads only its
shards and samples the same video as one process; rank 0 writes it. The last line says
the sampling time and the DiT tokens per second per rank.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from models.sampler import GuidanceTrace
from parallel.mesh import ParallelContext, shutdown
from trainer.block_cache_calibration import cache_settings
from trainer.config import ConfigError
from trainer.distill_config import student_sampling
from trainer.linear_guidance import calibration_path, load_coefficients
from trainer.mesh_sampling import (
    SampleParallelConfig,
    SamplingSpeed,
    check_split_guidance,
    load_on_mesh,
    split_guidance,
    video_tokens,
)
from trainer.run_config import parse_cli_options
from trainer.sampling import Cache, Guidance, generate_traced, write_videos


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
    cache: Cache = Cache.none        # reuse DiT blocks between steps (guidance cfg or none)
    cache_threshold: float = 0.1     # relative L1 change under which a block is reused; 0: off
    cache_file: str | None = None    # cache=block: default <run dir>/cache/block_steps<S>_...
    seed: int = 0
    num_videos: int = 1              # videos of the prompt, with seeds seed, seed+1, ...
    ema: bool = True
    frames: int | None = None        # default: the run's data.frames (and height, width)
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    device: str = "cpu"
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)


@dataclass
class SampleResult:
    paths: list[Path]            # the mp4s, written by rank 0 (none on the other ranks)
    traces: list[GuidanceTrace]  # what guidance did for each video
    videos: torch.Tensor         # (num_videos, 3, T, H, W) in [-1, 1], on every rank
    speed: SamplingSpeed
    mesh: ParallelContext


def sample(opts: SampleConfig) -> list[Path]:
    """-> the mp4 paths, one per video."""
    return sample_traced(opts)[0]


def sample_traced(opts: SampleConfig) -> tuple[list[Path], list[GuidanceTrace]]:
    """-> (the mp4 paths, what guidance did for each video)."""
    result = sample_result(opts)
    return result.paths, result.traces


def sample_result(opts: SampleConfig) -> SampleResult:
    """Sample as this process's place in the mesh ``opts.parallel`` (one process: all)."""
    run, sharding = load_on_mesh(opts.checkpoint, opts.parallel, opts.device, opts.ema,
                                 frames=opts.frames, height=opts.height, width=opts.width)
    ctx = sharding.ctx
    task = run.task
    # a distilled student samples on its trained times, conditional only (ConfigError
    # for other steps); None for any other run
    times = student_sampling(run.cfg, opts.steps)
    guidance = opts.guidance if times is None else Guidance.none
    linear = None
    if guidance is Guidance.linear_ag:
        linear = load_coefficients(calibration_path(run.run_dir, opts.steps, opts.guidance_scale),
                                   run.model, opts.steps, opts.guidance_scale)
    cache = sharding.cache(cache_settings(opts.cache, opts.cache_threshold, guidance, run,
                                          opts.steps, opts.guidance_scale, opts.cache_file))
    check_split_guidance(opts.parallel, guidance.value, opts.cache.value)
    split = split_guidance(run.model.dit, ctx)
    videos, traces = [], []
    start = time.perf_counter()
    for i in range(opts.num_videos):
        video, trace = generate_traced(run.model, task.autoencoder, [opts.prompt],
                                       task.latent_shape, opts.steps, opts.guidance_scale,
                                       opts.seed + i, guidance, opts.gamma, linear,
                                       times=times, cache=cache)
        videos.append(video)
        traces.append(trace)
    seconds = time.perf_counter() - start
    tokens = video_tokens(run.cfg, task.latent_shape) * sum(int(t.nfe.sum()) for t in traces)
    speed = SamplingSpeed(seconds, tokens, ctx.world_size, split.exchanged_bytes if split else 0)
    output_dir = Path(opts.output_dir) if opts.output_dir else run.run_dir / "samples" / "cli"
    videos = torch.cat(videos)
    paths = []
    if ctx.is_main:
        paths = write_videos(videos, [opts.prompt] * opts.num_videos, output_dir,
                             opts.fps or run.cfg.data.fps)
    return SampleResult(paths, traces, videos, speed, ctx)


def main(argv: list[str]) -> None:
    opts = parse_cli_options(SampleConfig, argv, "trainer.sample",
                             'checkpoint=<run dir> prompt="..." [key=value ...]')
    try:
        result = sample_result(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    shutdown(result.mesh)
    if not result.mesh.is_main:
        return
    for path, trace in zip(result.paths, result.traces, strict=True):
        switch = int(trace.switch_step[0])
        switched = f", conditional only from step {switch}" if switch >= 0 else ""
        print(f"{path.name}: NFE {int(trace.nfe[0])}{switched}, "
              f"{int(trace.block_evaluations[0])} block evaluations", file=sys.stderr)
        print(path)
    print(result.speed.describe(opts.num_videos, result.mesh, opts.parallel.cp_mode.value),
          file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
