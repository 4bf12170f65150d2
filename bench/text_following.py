"""Does the trained embedded-default model follow the text? All judges, per guidance scale.

    python bench/text_following.py checkpoint=runs/t2v_tiny [prompts=48 steps=25 ...]

Samples the captions of held-out synthetic clips (the validation split, never trained
on) and counts how often each judge of ``data.judges`` (colour, shape, direction,
speed) sees in the generated video what the prompt names. The empty-prompt row is the
prior: how often the model draws the named attribute with no text at all; chance is one
over the number of choices. ``sheet=path.png`` also writes the contact sheet of the
first ``sheet_rows`` videos at the first guidance scale.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from data.contact_sheet import write_contact_sheet
from data.judges import ATTRIBUTES, CHANCE, match_rates
from trainer.text_following import held_out_prompts, sample_and_judge
from trainer.trained import load_text_to_video


@dataclass
class Options:
    checkpoint: str = MISSING
    prompts: int = 48
    steps: int = 25
    # []: the run's own trainer.guidance_scale (what make train samples with), then 1 and 5
    guidance_scales: list[float] = field(default_factory=list)
    batch: int = 8
    seed: int = 1234
    sheet: str | None = None
    sheet_rows: int = 12
    json_out: str | None = None  # also write the rows as JSON here
    prior: bool = True  # also sample with the empty prompt


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    prompts = held_out_prompts(run.cfg.data, opts.prompts)
    scales = opts.guidance_scales or list(dict.fromkeys([run.cfg.trainer.guidance_scale, 1.0,
                                                         5.0]))
    rows = []
    for scale in scales:
        start = time.perf_counter()
        videos, rates = sample_and_judge(run.model, run.task.autoencoder, prompts,
                                         run.task.latent_shape, opts.steps, scale, opts.seed,
                                         opts.batch)
        rows.append((f"prompt, guidance {scale:g}", rates, time.perf_counter() - start))
        if opts.sheet and scale == scales[0]:
            write_contact_sheet(opts.sheet, videos[: opts.sheet_rows],
                                prompts[: opts.sheet_rows])
    if opts.prior:  # videos drawn with no text, judged against the held-out prompts' words
        empty, _ = sample_and_judge(run.model, run.task.autoencoder, [""] * len(prompts),
                                    run.task.latent_shape, opts.steps, 1.0, opts.seed,
                                    opts.batch)
        rows.append(("empty prompt (prior)", match_rates(empty, prompts), None))
    rows.append(("chance", CHANCE, None))
    print(f"\nText following of {run.run_dir} at step {run.step}: {opts.prompts} held-out "
          f"prompts, {opts.steps} Euler steps\n")
    print("| conditioning | " + " | ".join(ATTRIBUTES) + " | seconds |")
    print("|---|" + "---:|" * (len(ATTRIBUTES) + 1))
    for name, rates, seconds in rows:
        cells = " | ".join(f"{rates[a]:.1%}" for a in ATTRIBUTES)
        print(f"| {name} | {cells} | {'-' if seconds is None else f'{seconds:.1f}'} |")
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(
            {"run": str(run.run_dir), "step": run.step, "steps": opts.steps,
             "rows": [{"conditioning": n, **r} for n, r, _ in rows]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
