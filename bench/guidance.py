"""Adaptive Guidance against classifier-free guidance on a trained run, over thresholds.

    python bench/guidance.py checkpoint=runs/t2v_tiny [gammas=[0.99,0.995] steps=25 ...]
        [linear_ag=runs/t2v_tiny/guidance/linear_ag_steps25_scale5.json]

One ``trainer.evaluate`` table with a row per sampler: the full-CFG reference at
``reference_steps``, CFG at ``steps``, Adaptive Guidance at each threshold γ̄, LinearAG
at each of ``linear_ag_gammas`` when given a calibration file (``trainer.linear_guidance``;
γ̄ > 1 is LinearAG's prediction alone) and conditional-only, all on the same held-out
prompts and noise. Then the mean cosine
similarity of conditional and unconditional velocity per step along CFG's trajectories
(where a threshold switches), and whether each threshold meets the target: at least 25%
fewer NFE than CFG, PSNR against CFG at the same steps >= 30 dB, and colour and direction
judge rates no lower than CFG's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from trainer.evaluate import (
    SamplerSpec,
    describe,
    markdown_table,
    sampler_table,
)
from trainer.frechet import feature_extractor
from trainer.linear_guidance import load_coefficients
from trainer.peak_memory import PeakMemory
from trainer.sampling import Guidance
from trainer.trained import load_text_to_video

MIN_NFE_SAVED, MIN_PSNR_DB, KEPT_JUDGES = 0.25, 30.0, ("colour", "direction")


@dataclass
class Options:
    checkpoint: str = MISSING
    gammas: list[float] = field(default_factory=lambda: [0.95, 0.99, 0.995, 0.999])
    steps: int = 25
    scale: float = 5.0
    reference_steps: int = 50
    prompts: int = 48
    seed: int = 1234
    batch: int = 8
    features: str = "auto"
    linear_ag: str | None = None  # a calibration file for these steps and scale
    linear_ag_gammas: list[float] = field(default_factory=lambda: [1.5])
    json_out: str | None = None


def verdict(row: dict, cfg_row: dict) -> str:
    """Which parts of the target an adaptive row misses, or "met"."""
    misses = []
    saved = 1 - row["nfe_per_video"] / cfg_row["nfe_per_video"]
    if saved < MIN_NFE_SAVED:
        misses.append(f"NFE saved {saved:.1%} < {MIN_NFE_SAVED:.0%}")
    if row["psnr_vs_same_steps_cfg_db"] < MIN_PSNR_DB:
        misses.append(f"PSNR vs CFG {row['psnr_vs_same_steps_cfg_db']:.1f} < "
                      f"{MIN_PSNR_DB:g} dB")
    misses += [f"{judge} {row[judge]:.1%} < CFG {cfg_row[judge]:.1%}"
               for judge in KEPT_JUDGES if row[judge] < cfg_row[judge]]
    return "met" if not misses else "not met: " + "; ".join(misses)


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    extractor = feature_extractor(opts.features, run.task.autoencoder)
    memory = PeakMemory(torch.device("cpu"))
    cfg = SamplerSpec(Guidance.cfg, opts.steps, opts.scale)
    samplers = [cfg, *(SamplerSpec(Guidance.adaptive, opts.steps, opts.scale, gamma)
                       for gamma in opts.gammas)]
    if opts.linear_ag:
        linear = load_coefficients(Path(opts.linear_ag), run.model, opts.steps, opts.scale)
        samplers += [SamplerSpec(Guidance.linear_ag, opts.steps, opts.scale, gamma, linear)
                     for gamma in opts.linear_ag_gammas]
    samplers.append(SamplerSpec(Guidance.none, opts.steps, opts.scale))
    table = sampler_table(run, samplers, opts.reference_steps, opts.scale, opts.prompts,
                          extractor, opts.seed, opts.batch, memory)
    rows = table["rows"]
    print(describe(table) + "\n\n" + markdown_table(rows))
    cfg_row = rows[1]
    print("\n1 - mean cosine of conditional and unconditional velocity per step, CFG at "
          f"{opts.steps} steps:\n"
          + " ".join(f"{1 - c:.1e}" for c in cfg_row["mean_cosine_by_step"]))
    print("\nTarget (>= 25% fewer NFE than CFG, PSNR vs CFG >= 30 dB, colour and direction "
          "no lower than CFG):")
    for row in rows:
        if row.get("gamma") is not None:
            print(f"- {row['sampler']}: {verdict(row, cfg_row)}")
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
