"""Does the trained embedded-default model follow the text? A colour-match table.

    python bench/text_following.py checkpoint=runs/t2v_tiny [prompts=48 steps=25 ...]

Samples the captions of held-out synthetic clips (the validation split, never trained
on) and counts how often the dominant colour of the generated video is the colour the
prompt names (``data.synthetic.dominant_colour``, a majority vote of clearly coloured
pixels). Chance is 1/6. Also reports the unguided rate and the rate with an empty
prompt, so the table shows what the text, not the prior, contributes.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from data.synthetic import COLOURS, SyntheticVideos, colour_in_caption, dominant_colour
from trainer.sampling import generate
from trainer.trained import load_text_to_video


@dataclass
class Options:
    checkpoint: str = MISSING
    prompts: int = 48
    steps: int = 25
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 5.0])
    batch: int = 8
    seed: int = 1234


def held_out_prompts(run, count: int) -> list[str]:
    data = run.cfg.data
    val = SyntheticVideos(count, data.frames, data.height, data.width, data.fps, data.seed,
                          split="val")
    return [val.spec(i).caption for i in range(count)]


def match_rate(run, prompts: list[str], opts: Options, scale: float,
               named: list[str]) -> tuple[float, Counter]:
    hits, per_colour = 0, Counter()
    for start in range(0, len(prompts), opts.batch):
        chunk = prompts[start: start + opts.batch]
        videos = generate(run.model, run.task.autoencoder, chunk, run.task.latent_shape, opts.steps,
                          scale, seed=opts.seed + start)
        for video, colour in zip(videos, named[start: start + opts.batch], strict=True):
            if dominant_colour(video) == colour:
                hits += 1
                per_colour[colour] += 1
    return hits / len(prompts), per_colour


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    prompts = held_out_prompts(run, opts.prompts)
    named = [colour_in_caption(p) for p in prompts]
    rows = []
    for scale in opts.guidance_scales:
        start = time.perf_counter()
        rate, per_colour = match_rate(run, prompts, opts, scale, named)
        rows.append((f"prompt, guidance {scale:g}", rate, per_colour, time.perf_counter() - start))
    empty_rate, _ = match_rate(run, [""] * len(prompts), opts, 1.0, named)
    counts = Counter(named)
    print(f"\nText following of {run.run_dir} at step {run.step}: {opts.prompts} held-out "
          f"prompts, {opts.steps} Euler steps, chance = {1 / len(COLOURS):.2f}\n")
    print("| conditioning | colour match | " + " | ".join(COLOURS) + " | seconds |")
    print("|---|---|" + "---|" * len(COLOURS) + "---|")
    for name, rate, per_colour, seconds in rows:
        cells = " | ".join(f"{per_colour[c]}/{counts[c]}" for c in COLOURS)
        print(f"| {name} | {rate:.1%} | {cells} | {seconds:.1f} |")
    print(f"| empty prompt (prior) | {empty_rate:.1%} | " + " | ".join("-" for _ in COLOURS)
          + " | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
