"""Who decides where the object goes: the noise or the prompt? And at what noise level?

    python bench/direction_decision.py checkpoint=runs/t2v_tiny [clips=24 starts=[0,0.1,0.3]]

Held-out clips (the validation split) are noised to x_t at a start time t0 (t = 0 is pure
noise) and sampled from there to t = 1 with the run's sampler (linear-quadratic times after
t0, CFG at ``guidance``), once with the clip's own caption and once with its direction
word replaced by the opposite one; ``data.judges`` reads the motion of every result. Per t0
it prints how often the result moves the way the clip did (its true caption, and under
the opposite caption) and how often it moves the way the opposite caption says. A model
that follows direction text steers the object to the prompt's direction for every t0
below the one where the noisy clip already fixes the motion; one that ignores the
direction word keeps the clip's motion from that t0 on and moves at random before it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from data.judges import NONE, judge_motion
from data.synthetic import SyntheticVideos
from models.sampler import linear_quadratic_schedule
from trainer.sampling import generate_traced
from trainer.trained import load_text_to_video

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class Options:
    checkpoint: str = MISSING
    clips: int = 24
    starts: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.3])
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0


def with_direction(caption: str, direction: str) -> str:
    """"a red square moving left slowly" -> the same caption with ``direction``."""
    words = caption.split()
    words[words.index("moving") + 1] = direction
    return " ".join(words)


def sample_from(run, x_t: torch.Tensor, t0: float, prompts: list[str], steps: int,
                guidance: float) -> list[tuple[str, str]]:
    """Sample from x_t at t0 with ``prompts``; the judged (direction, speed) per video."""
    full = linear_quadratic_schedule(steps)
    times = torch.cat([torch.tensor([t0], dtype=torch.float64), full[full > t0]])
    videos, _ = generate_traced(run.model, run.task.autoencoder, prompts, tuple(x_t.shape[1:]),
                                len(times) - 1, guidance, seed=0, times=times, start=x_t)
    return [judge_motion(video) for video in videos]


def rate(judged: list[str], wanted: list[str]) -> str:
    """How often the judged direction is the wanted one, as a percentage."""
    hits = sum(j == w for j, w in zip(judged, wanted, strict=True))
    return f"{100 * hits / len(wanted):.1f}%"


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    data = run.cfg.data
    val = SyntheticVideos(opts.clips, data.frames, data.height, data.width, data.fps, data.seed,
                          split="val")
    specs = [val.spec(i) for i in range(opts.clips)]
    x1 = run.task.autoencoder.encode(torch.stack([val[i]["video"] for i in range(opts.clips)]))
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(opts.seed))
    captions = [spec.caption for spec in specs]
    clip_dirs = [spec.direction for spec in specs]
    opposite = [with_direction(spec.caption, OPPOSITE[spec.direction]) for spec in specs]
    print(f"{opts.clips} held-out clips, {opts.steps}-step schedule, guidance {opts.guidance}")
    print("| t0 | true caption: clip's direction | true caption: no motion "
          "| opposite caption: clip's direction | opposite caption: prompt's direction |")
    print("|---:|---:|---:|---:|---:|")
    for t0 in opts.starts:
        x_t = t0 * x1 + (1 - t0) * x0
        true = [d for d, _ in sample_from(run, x_t, t0, captions, opts.steps, opts.guidance)]
        flipped = [d for d, _ in sample_from(run, x_t, t0, opposite, opts.steps, opts.guidance)]
        print(f"| {t0:g} | {rate(true, clip_dirs)} | {rate(true, [NONE] * len(true))} "
              f"| {rate(flipped, clip_dirs)} "
              f"| {rate(flipped, [OPPOSITE[d] for d in clip_dirs])} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
