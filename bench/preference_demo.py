"""Preference tuning against rejection-sampling SFT at equal compute, on the synthetic set.

    python bench/preference_demo.py base=runs/t2v_tiny out=runs/preference_demo

1. Pairs: the base model samples ``per_prompt`` videos for each of ``prompts`` captions of
   the synthetic set's training split; ``data.judges`` scores each (how many of colour,
   shape, direction and speed match the caption). The best and the worst of a caption
   make a preference pair when their scores differ (ties give no pair). Written as
   preference shards (``KEY.win.mp4``, ``KEY.lose.mp4``, ``KEY.txt``) and, for the
   baseline, shards of the winners alone (``KEY.mp4``, ``KEY.txt``).
2. Training, both from the base weights through the real CLI: Diffusion-DPO on the pairs
   (``recipe=preference recipe.loss=dpo``, the reference a frozen copy of the base), and
   SFT (plain flow matching) on the winners. Equal compute: a DPO step of B pairs runs the
   policy forward and backward on 2B clips plus the reference forward on 2B clips; an SFT
   step of 2B clips runs the first part only. With backward = 2 forwards that is 4/3 of
   an SFT step, so SFT gets 4/3 as many steps of 2B clips (the wall times are printed).
3. Judging: base (its EMA weights, as shipped), DPO and SFT (their training weights: a
   short run's EMA still holds much of the base) sample the captions of the held-out
   validation split (never trained on, nor used for pairs) with the same seeds; the table
   gives the judges' match rates.

Shard data tags captions with their frame rate (" FPS-8", as Movie Gen conditions it),
which the base never saw; both tuned models learn the tag from the same captions and are
judged on the held-out captions with the tag, the base without it (its training form).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.judges import ATTRIBUTES, CHANCE, caption_judgement, judge_video
from data.shards import write_shard
from data.synthetic import SyntheticVideos
from data.video import video_to_uint8, write_video
from trainer.text_following import held_out_prompts, sample_and_judge
from trainer.trained import load_text_to_video


@dataclass
class Options:
    base: str = "runs/t2v_tiny"  # a t2v run (or one of its checkpoints) on the synthetic set
    out: str = "runs/preference_demo"
    prompts: int = 64  # training-split captions to make pairs from
    per_prompt: int = 4  # samples per caption; its best and worst make the pair
    steps: int = 25  # Euler steps for pair sampling and judging
    guidance: float = 5.0
    held_out: int = 48  # held-out captions judged before and after
    dpo_steps: int = 150
    pairs_per_step: int = 4
    lr: float = 1.0e-4
    beta: float = 500.0
    seed: int = 0


def score(video: torch.Tensor, caption: str) -> int:
    """How many of the caption's attributes the judges see in the video."""
    seen, named = judge_video(video), caption_judgement(caption)
    return sum(getattr(seen, a) == getattr(named, a) for a in ATTRIBUTES)


def mp4_bytes(video: torch.Tensor, path: Path, fps: float) -> bytes:
    write_video(path, video_to_uint8(video), fps)
    return path.read_bytes()


def make_pairs(opts: Options, out: Path) -> dict:
    """Sample, judge, and write the preference and winner shards -> counts."""
    run = load_text_to_video(Path(opts.base), torch.device("cpu"))
    data = run.cfg.data
    train = SyntheticVideos(opts.prompts, data.frames, data.height, data.width, data.fps,
                            data.seed, split="train")
    captions = [train.spec(i).caption for i in range(opts.prompts)]
    samples = [sample_and_judge(run.model, run.task.autoencoder, captions,
                                run.task.latent_shape, opts.steps, opts.guidance,
                                seed=opts.seed + 1000 * (k + 1))[0]
               for k in range(opts.per_prompt)]
    pairs, winners, scores, tmp = [], [], [], out / "tmp.mp4"
    for i, caption in enumerate(captions):
        ranked = sorted(((score(s[i], caption), k) for k, s in enumerate(samples)), reverse=True)
        scores.extend(s for s, _ in ranked)
        (best, kb), (worst, kw) = ranked[0], ranked[-1]
        if best == worst:
            continue
        win = mp4_bytes(samples[kb][i], tmp, data.fps)
        lose = mp4_bytes(samples[kw][i], tmp, data.fps)
        key = f"{i:06d}"
        pairs.append({"__key__": key, "win.mp4": win, "lose.mp4": lose, "txt": caption})
        winners.append({"__key__": key, "mp4": win, "txt": caption})
    tmp.unlink(missing_ok=True)
    write_shard(out / "pairs" / "000000.tar", pairs)
    write_shard(out / "winners" / "000000.tar", winners)
    return {"captions": len(captions), "samples": len(scores), "pairs": len(pairs),
            "mean score": sum(scores) / len(scores), "fps": data.fps}


def train(experiment: str, name: str, out: Path, overrides: list[str]) -> float:
    """Run the training CLI -> wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.train", f"experiment={experiment}",
                    f"run_name={name}", f"hydra.run.dir={out / name}", *overrides],
                   check=True)
    return time.perf_counter() - start


def judge(checkpoint: Path, prompts: list[str], opts: Options, ema: bool) -> dict[str, float]:
    run = load_text_to_video(checkpoint, torch.device("cpu"), ema=ema)
    return sample_and_judge(run.model, run.task.autoencoder, prompts, run.task.latent_shape,
                            opts.steps, opts.guidance, opts.seed)[1]


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = make_pairs(opts, out)
    print(json.dumps(counts))
    fps = counts["fps"]
    common = [f"trainer.init_from={opts.base}", f"recipe.lr={opts.lr}", "trainer.val_every=100000",
              "trainer.sample_every=100000", "trainer.ckpt_every=100000",
              "trainer.wandb.mode=disabled",
              f"data.fps={fps}", "recipe.warmup_steps=5"]
    sft_steps = round(opts.dpo_steps * 4 / 3)
    dpo_s = train("preference_tiny", "dpo", out, [*common, f"data.shards={out}/pairs/000000.tar",
                               "recipe.loss=dpo", f"recipe.beta={opts.beta}",
                               f"recipe.batch_size={opts.pairs_per_step}",
                               f"data.batch_sizes=[{opts.pairs_per_step}]",
                               f"trainer.max_steps={opts.dpo_steps}"])
    # t2v_tiny: the base's own recipe (flow matching, its t distribution), on the winners
    sft_s = train("t2v_tiny", "sft", out, [*common, "data=webdataset", "data.sizes=[[32,32]]",
                               f"data.shards={out}/winners/000000.tar", "data.durations=[8]",
                               "data.num_workers=0", "data.image_batch_size=8",
                               f"recipe.batch_size={2 * opts.pairs_per_step}",
                               f"data.batch_sizes=[{2 * opts.pairs_per_step}]",
                               f"trainer.max_steps={sft_steps}"])
    base_cfg = load_text_to_video(Path(opts.base), torch.device("cpu")).cfg
    prompts = held_out_prompts(base_cfg.data, opts.held_out)
    tagged = [f"{p} FPS-{fps:g}" for p in prompts]
    rows = [("base", "-", judge(Path(opts.base), prompts, opts, ema=True)),
            (f"DPO, {opts.dpo_steps} steps of {opts.pairs_per_step} pairs", f"{dpo_s:.0f}",
             judge(out / "dpo", tagged, opts, ema=False)),
            (f"SFT on the winners, {sft_steps} steps of {2 * opts.pairs_per_step} clips",
             f"{sft_s:.0f}", judge(out / "sft", tagged, opts, ema=False)),
            ("chance", "-", CHANCE)]
    print(f"\n{counts['pairs']} pairs from {counts['samples']} samples of {counts['captions']} "
          f"training captions (mean score {counts['mean score']:.2f} of {len(ATTRIBUTES)}); "
          f"{opts.held_out} held-out captions, {opts.steps} Euler steps, guidance "
          f"{opts.guidance:g}\n")
    print("| model | train wall (s) | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---:|" + "---:|" * len(ATTRIBUTES))
    for name, seconds, rates in rows:
        print(f"| {name} | {seconds} | " + " | ".join(f"{rates[a]:.1%}" for a in ATTRIBUTES) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
