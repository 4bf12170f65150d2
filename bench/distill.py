"""A few-step Imagine Flash student against few-step Euler of its teacher.

    python bench/distill.py [teacher=runs/t2v_tiny student_dir=/tmp/cinetron_distill minutes=30]

Distils a ``steps``-step student from the teacher run (``task=distill``, the teacher's
model and data shapes) for ``minutes`` of wall time: the training run is sent SIGTERM
then, checkpoints and exits (a student_dir that already holds a run resumes it; pass
``minutes=0`` to only evaluate). Then, on the first ``prompts`` held-out captions with
the same noise per prompt (``trainer.evaluate``'s sampling and scoring), one table with:
the teacher's full-CFG ``reference_steps`` reference, the teacher's CFG Euler at
``steps`` steps (the linear-quadratic schedule ``trainer.sample steps=3`` gives a
teacher; also at the student's times when they differ), the teacher conditional-only on
the student's times (the student before training) and the student, EMA and training
weights. PSNR/SSIM are against the teacher's reference, "PSNR vs CFG same steps" against
the teacher's CFG Euler at ``steps``; the judges read each video.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.judges import match_rates
from models.sampler import linear_quadratic_schedule
from trainer.distill_config import student_sampling
from trainer.evaluate import (
    SamplerSpec,
    held_out_clips,
    markdown_table,
    sample_set,
    score,
)
from trainer.frechet import feature_extractor
from trainer.peak_memory import PeakMemory
from trainer.run_config import checkpoint_metadata, config_from_metadata
from trainer.sampling import Guidance
from trainer.text_following import held_out_prompts
from trainer.trained import load_text_to_video, locate_checkpoint

# the teacher run's overrides that shape the model and its data (the student must match)
SHAPE_KEYS = ("model.", "data.", "text.", "autoencoder.")


@dataclass
class Options:
    teacher: str = "runs/t2v_tiny"  # what make train writes
    student_dir: str = "/tmp/cinetron_distill"
    # ~3300 steps on one idle core: the student that beat 3-step Euler (bench/RESULTS.md)
    minutes: float = 30.0
    steps: int = 3
    shift: float = 0.75
    # teacher_trajectory beat the paper's shifted_reconstruction here (bench/RESULTS.md)
    target: str = "teacher_trajectory"
    teacher_steps: int = 8          # recipe.teacher_steps of the teacher_trajectory target
    lr: float = 3.0e-4
    warmup_steps: int = 5
    ema_decay: float = 0.99
    batch_size: int = 4
    # the teacher's guidance, in training and the table (None: the teacher run's own)
    scale: float | None = None
    reference_steps: int = 50
    prompts: int = 48
    seed: int = 1234
    batch: int = 8
    features: str = "auto"
    json_out: str | None = None


def train_command(opts: Options) -> list[str]:
    saved = OmegaConf.load(Path(opts.teacher) / ".hydra" / "overrides.yaml")
    shape = [o for o in saved if o.startswith(SHAPE_KEYS) and not o.startswith("data.judge")]
    return [sys.executable, "-m", "trainer.train", "experiment=distill_tiny",
            f"hydra.run.dir={opts.student_dir}", *shape, f"trainer.init_from={opts.teacher}",
            f"recipe.steps={opts.steps}", f"recipe.shift={opts.shift}",
            f"recipe.target={opts.target}", f"recipe.teacher_steps={opts.teacher_steps}",
            f"recipe.lr={opts.lr}",
            f"recipe.warmup_steps={opts.warmup_steps}", f"recipe.ema_decay={opts.ema_decay}",
            f"recipe.batch_size={opts.batch_size}", f"recipe.teacher_guidance={opts.scale}",
            "trainer.max_steps=1000000", "trainer.val_every=1000000",
            "trainer.sample_every=1000000", "trainer.ckpt_every=25", "trainer.log_every=5",
            "trainer.wandb.mode=disabled", "trainer.progress=false", "trainer.sample_prompts=[]"]


def train(opts: Options) -> None:
    """Run the distillation for ``opts.minutes``, then preempt it (it checkpoints)."""
    log = Path(opts.student_dir) / "bench_train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        process = subprocess.Popen(train_command(opts), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60 * opts.minutes
        while time.time() < deadline and process.poll() is None:
            time.sleep(1)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        process.wait()
    print(f"distillation stopped after {opts.minutes:g} minutes (exit {process.returncode}); "
          f"log {log}", flush=True)


def loss_trend(student_dir: str) -> tuple[int, float, float]:
    """(last step, mean loss of the first 10 logged steps, of the last 10) of the student."""
    losses = {}
    for line in open(Path(student_dir) / "metrics.jsonl"):
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    ordered = [losses[step] for step in sorted(losses)]
    return max(losses), sum(ordered[:10]) / len(ordered[:10]), sum(ordered[-10:]) / len(
        ordered[-10:])


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    if opts.scale is None:
        run_dir, step_dir = locate_checkpoint(Path(opts.teacher), "teacher")
        opts.scale = config_from_metadata(checkpoint_metadata(run_dir, step_dir)
                                          ).trainer.guidance_scale
    if opts.minutes > 0:
        train(opts)
    cpu = torch.device("cpu")
    teacher = load_text_to_video(Path(opts.teacher), cpu)
    students = {"EMA": load_text_to_video(Path(opts.student_dir), cpu),
                "training weights": load_text_to_video(Path(opts.student_dir), cpu, ema=False)}
    times = student_sampling(students["EMA"].cfg, opts.steps)
    prompts = held_out_prompts(teacher.cfg.data, opts.prompts)
    real = held_out_clips(teacher.cfg.data, opts.prompts)
    extractor = feature_extractor(opts.features, teacher.task.autoencoder)
    real_features = extractor.features(real)
    memory = PeakMemory(cpu)

    reference = SamplerSpec(Guidance.cfg, opts.reference_steps, opts.scale)
    reference_set = sample_set(teacher, reference, prompts, opts.seed, opts.batch, memory)
    rows = [{**score(reference, reference_set, prompts, None, None, real_features, extractor),
             "sampler": f"teacher {reference.name} (reference)"}]
    euler = SamplerSpec(Guidance.cfg, opts.steps, opts.scale)
    euler_set = sample_set(teacher, euler, prompts, opts.seed, opts.batch, memory)
    rows.append({**score(euler, euler_set, prompts, reference_set.videos, None, real_features,
                         extractor), "sampler": f"teacher {euler.name} (linear-quadratic)"})
    runs = [("teacher", teacher, SamplerSpec(Guidance.none, opts.steps, 1.0, times=times)),
            *((f"student ({which}, step {run.step})", run,
               SamplerSpec(Guidance.none, opts.steps, 1.0, times=times))
              for which, run in students.items())]
    if not torch.equal(times, linear_quadratic_schedule(opts.steps)):
        runs.insert(0, ("teacher", teacher,
                        SamplerSpec(Guidance.cfg, opts.steps, opts.scale, times=times)))
    for label, run, spec in runs:
        sampled = sample_set(run, spec, prompts, opts.seed, opts.batch, memory)
        rows.append({**score(spec, sampled, prompts, reference_set.videos, euler_set.videos,
                             real_features, extractor), "sampler": f"{label} {spec.name}"})
    rows.append({"sampler": "held-out real clips", **match_rates(list(real), prompts)})
    step, first, last = loss_trend(opts.student_dir)
    print(f"Teacher {opts.teacher} step {teacher.step}; student {opts.student_dir}: "
          f"{step} distillation steps of {opts.batch_size} prompts (loss {first:.4f} over the "
          f"first 10 logged steps, {last:.4f} over the last 10); {opts.prompts} held-out "
          f"prompts, seed {opts.seed}; Fréchet on {extractor.label}.\n")
    print(markdown_table(rows))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps({"options": vars(opts), "rows": rows},
                                                  indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
