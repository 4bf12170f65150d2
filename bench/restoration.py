"""Can a trained text-to-video model restore a real held-out clip from noise level t?

    python bench/restoration.py checkpoint=runs/t2v_tiny [clips=96 times=[0.3,0.5,0.7,0.85,0.95]]

Each of the first ``clips`` clips of the synthetic validation split (never trained on) is
noised to time t on the flow's straight path (t = 1 is data), and the model's clean-clip
estimate x̂1 from that one step (its own caption, no guidance) is judged for shape. The
table says, per t and per named shape, how many restorations the shape judge still
calls that shape. Where a sampled video misses a shape that the model restores from a
given t, the miss is committed earlier in the trajectory than t: it is a question of what
the model draws when the pixels no longer decide, not of how well it denoises.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from data.judges import caption_judgement, judge_shape
from data.synthetic import SHAPES
from models.flow import FlowMatching
from trainer.evaluate import held_out_clips
from trainer.run_config import parse_cli_options
from trainer.text_following import held_out_prompts
from trainer.trained import TrainedRun, load_text_to_video

USAGE = "python bench/restoration.py checkpoint=RUN [clips=96 times=[0.3,0.5] batch=16 seed=0]"


@dataclass
class Options:
    checkpoint: str = MISSING
    clips: int = 96
    times: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.85, 0.95])
    batch: int = 16
    seed: int = 0


@torch.no_grad()
def restored_shapes(run: TrainedRun, clips: int, times: list[float], batch: int = 16,
                    seed: int = 0) -> dict[float, dict[str, tuple[int, int]]]:
    """t -> shape name -> (restorations judged as that shape, clips of that shape)."""
    captions = held_out_prompts(run.cfg.data, clips)
    wanted = [caption_judgement(caption).shape for caption in captions]
    clean = run.task.autoencoder.encode(held_out_clips(run.cfg.data, clips))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    context, mask = run.model.text(captions)
    flow = FlowMatching(sigma_min=run.cfg.recipe.sigma_min)
    table = {}
    for t in times:
        time = torch.full((clips,), float(t))
        noisy = flow.interpolate(noise, clean, time)
        velocity = torch.cat([
            run.model.dit(noisy[i: i + batch], time[i: i + batch], context[i: i + batch],
                          mask[i: i + batch])
            for i in range(0, clips, batch)])
        videos = run.task.autoencoder.decode(flow.predicted_data(noisy, velocity, time))
        seen = [judge_shape(video) for video in videos.clamp(-1, 1)]
        table[t] = {shape: (sum(w == s == shape for w, s in zip(wanted, seen, strict=True)),
                            wanted.count(shape)) for shape in SHAPES}
    return table


def main(argv: list[str]) -> None:
    opts: Options = parse_cli_options(Options, argv, "bench/restoration.py", USAGE)
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    table = restored_shapes(run, opts.clips, opts.times, opts.batch, opts.seed)
    print(f"\nShape of one-step restorations of {opts.clips} held-out clips from "
          f"{opts.checkpoint}, noise seed {opts.seed}\n")
    print("| t | " + " | ".join(SHAPES) + " |")
    print("|---:|" + "---:|" * len(SHAPES))
    for t, row in table.items():
        print(f"| {t:g} | " + " | ".join(f"{hit} / {total}" for hit, total in row.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
