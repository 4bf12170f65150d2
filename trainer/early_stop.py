"""What validation decides besides logging: the plateau LR cut (``trainer.optim``) and early
stopping, both from ``recipe.val_metric`` (lower is better).

Every rank takes rank 0's value, so the decisions are the same everywhere even if a float
reduction differed in the last bit. Early stopping keeps the checkpoint of the best
validation (a checkpoint is written at every improvement and never rotated out while it
is the best) and names it in ``<run>/best.json``; the CLIs that take a run directory
(sample, export, average, init_from) then use that checkpoint. A stopped run's last
checkpoint records the stop, so running the command again trains no further.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from parallel.mesh import ParallelContext
from trainer.config import ConfigError, EarlyStopConfig, LRSchedule, TrainConfig

BEST_FILE = "best.json"


class Improvement:
    """Best value so far and validations in a row without improving on it by more than
    ``min_delta`` relative (a non-finite value never improves)."""

    def __init__(self, min_delta: float = 0.0):
        self.min_delta = min_delta
        self.best = math.inf
        self.bad = 0

    def update(self, value: float) -> bool:
        """True when ``value`` is a new best."""
        improved = math.isfinite(value) and (
            math.isinf(self.best) or value < self.best - self.min_delta * abs(self.best))
        if improved:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]


class EarlyStopping:
    """``stopped`` once the watched value has not improved for ``patience`` validations in
    a row (``enabled`` only with patience >= 1); ``best_step`` is the best validation's."""

    def __init__(self, cfg: EarlyStopConfig):
        self.patience = cfg.patience
        self.watch = Improvement(cfg.min_delta)
        self.best_step: int | None = None
        self.stopped = False
        self.published: int | None = None  # the step best.json names (not saved: see keep_steps)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def observe(self, step: int, value: float) -> bool:
        """One validation at ``step``; True when it is the best so far."""
        improved = self.watch.update(value)
        if improved:
            self.best_step = step
        self.stopped = self.enabled and self.watch.bad >= self.patience
        return improved

    def keep_steps(self) -> set[int]:
        """Checkpoints that rotation must keep: the best one, and the one best.json still
        names while the new best's checkpoint is being written."""
        if not self.enabled:
            return set()
        return {step for step in (self.best_step, self.published) if step is not None}

    def publish(self, run_dir: Path, checkpoint: Path, metric: str, is_main: bool) -> None:
        """Name the best checkpoint, just written, in ``<run>/best.json`` (atomically)."""
        self.published = self.best_step
        if not is_main:
            return
        record = {"step": self.best_step, "checkpoint": str(checkpoint.relative_to(run_dir)),
                  "metric": metric, "value": self.watch.best}
        tmp = run_dir / f".{BEST_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, run_dir / BEST_FILE)

    def state_dict(self) -> dict:
        return {"best_step": self.best_step, "stopped": self.stopped,
                **self.watch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.best_step, self.stopped = state["best_step"], state["stopped"]
        self.watch.load_state_dict(state)


def watched_value(cfg: TrainConfig, metrics: dict[str, float], ctx: ParallelContext) -> float:
    """``recipe.val_metric`` of one validation, rank 0's on every rank."""
    name = cfg.recipe.val_metric
    if name not in metrics:
        raise ConfigError(f"recipe.val_metric={name} is not a validation metric of "
                          f"task={cfg.task.value}; pick one of {sorted(metrics)}")
    return float(ctx.gather_objects(metrics[name])[0])


def on_validation(cfg: TrainConfig, step: int, metrics: dict[str, float], scheduler,
                  stopper: EarlyStopping, ctx: ParallelContext, monitor) -> bool:
    """Feed one validation to the plateau schedule and early stopping; True when it is the
    best so far with early stopping on (the caller then writes a checkpoint)."""
    watch_lr = cfg.recipe.schedule is LRSchedule.plateau
    if not (watch_lr or stopper.enabled):
        return False
    value = watched_value(cfg, metrics, ctx)
    if scheduler.observe(value):
        lr = scheduler.get_last_lr()[0]
        monitor.record("lr_cut", step, lr=lr, **{cfg.recipe.val_metric: value})
        monitor.write(f"step {step}: {cfg.recipe.val_metric} {value:.6g} has not improved for "
                      f"{cfg.recipe.plateau.patience} validations: LR cut to {lr:.4g}")
    if not stopper.enabled:
        return False
    improved = stopper.observe(step, value)
    if stopper.stopped:
        monitor.record("early_stop", step, best_step=stopper.best_step, best=stopper.watch.best)
        monitor.write(f"step {step}: early stop, {cfg.recipe.val_metric} has not improved for "
                      f"{stopper.patience} validations; the best is step {stopper.best_step} "
                      f"({stopper.watch.best:.6g})")
    return improved


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``<run>/best.json`` names, or None when the run has none."""
    path = run_dir / BEST_FILE
    if not path.is_file():
        return None
    return run_dir / json.loads(path.read_text())["checkpoint"]
