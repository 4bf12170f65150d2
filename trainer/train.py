"""``python -m trainer.train [experiment=...] [key=value ...]``: train, resuming if it can.

One run directory per ``run_name`` (``runs/<run_name>``) holds the resolved config
(``.hydra/``), ``metrics.jsonl``, ``checkpoints/``, ``samples/`` and the wandb run.
Starting the same command again resumes from the newest intact checkpoint; every later
step's loss is bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from parallel.checkpoint import Checkpointer, Written
from parallel.engine import TrainingEngine
from parallel.fsdp import needs_fsdp
from parallel.mesh import ParallelContext, init_parallel, read_launch_env, shutdown
from parallel.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from trainer.build import build_engine
from trainer.config import (
    ConfigError,
    Engine,
    TrainConfig,
    register_configs,
    to_train_config,
)
from trainer.data import build_datasets, build_train_batches, build_val_batches
from trainer.draws import StepDraws
from trainer.early_stop import EarlyStopping, on_validation
from trainer.ema import EMA
from trainer.init_from import initialise_from
from trainer.metrics import Monitor
from trainer.precision import ResolvedPrecision, apply_tf32, autocast, resolve_precision
from trainer.resume_settings import check_resume, launch_metadata, with_run_config
from trainer.run_lock import RunDirInUse, RunDirLock
from trainer.start_checks import check_parallel_fits, check_start
from trainer.step_log import NonFiniteGuard, StepLog
from trainer.tasks import build_task
from trainer.validation import validate_in_step


def train_step(cfg, step, batch, engine, task, ema, ctx) -> dict[str, torch.Tensor | float]:
    """One optimizer step on this rank's rows of the global batch, with no host read: the
    loss, gradient norm and task metrics (means over the data-parallel replicas) as 0-d
    device tensors, the LR as a number. A step whose loss or gradient norm is non-finite
    changes no weight, optimizer state or EMA, decided on the device (``StepLog`` counts
    it when the values are read); its grad_norm is nan when its loss was non-finite."""
    engine.zero_grad()
    local = len(batch["caption"])
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    with autocast(cfg, ctx.device):
        loss, extras = task.loss(engine.module, batch,
                                 StepDraws(cfg.trainer.seed, step, ctx.device),
                                 rows, local * ctx.dp_size, step)
    mean_loss = ctx.mean_over_dp(loss)
    finite_loss = torch.isfinite(mean_loss)
    lr = engine.scheduler.get_last_lr()[0]
    engine.backward(loss)  # a non-finite loss too: skipping it would need a host read

    def finite(norm) -> torch.Tensor:
        return finite_loss & torch.isfinite(torch.as_tensor(norm))

    max_norm = cfg.recipe.grad_clip if cfg.recipe.grad_clip > 0 else math.inf
    grad_norm = torch.as_tensor(engine.clip_and_step(max_norm, finite))
    ema.update(step, finite(grad_norm))
    engine.scheduler.step()
    return {"loss": mean_loss, "grad_norm": torch.where(finite_loss, grad_norm, math.nan),
            "lr": lr, **{name: ctx.mean_over_dp(value) for name, value in extras.items()}}


def log_validation(task, step, model, ema, val_batches, monitor, ctx) -> dict[str, float] | None:
    """Validate with the training weights and with the EMA weights (the ones shown), on
    batches every rank holds alike; the metrics, the EMA's with an ``_ema`` suffix. None
    when the ranks share no held-out batch (logged; this validation is skipped)."""
    val = validate_in_step(task, model, val_batches, ctx, step, monitor)
    with ema.swapped_in():
        ema_val = validate_in_step(task, model, val_batches, ctx, step, monitor)
    if val is None or ema_val is None:
        return None
    val |= {f"{k}_ema": v for k, v in ema_val.items()}
    monitor.record("val", step, **val)
    monitor.log_wandb({f"val/{k}": v for k, v in val.items()}, step)
    return val


def reads_host(cfg: TrainConfig, step: int) -> bool:
    """Whether the loop reads the step values at ``step``: the first step, every
    ``trainer.log_every`` steps, and the steps that stop for the host anyway (validation,
    samples, checkpoints, the last), so metrics.jsonl stays in step order and a checkpoint
    holds the guard's counts up to its step."""
    trainer = cfg.trainer
    return step == 1 or step == trainer.max_steps or any(
        step % every == 0 for every in (trainer.log_every, trainer.val_every,
                                        trainer.sample_every, trainer.ckpt_every))


def trainer_state(step, stateful) -> dict:
    return {"step": step, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            **{name: obj.state_dict() for name, obj in stateful.items()}}


def save_checkpoint(directory: Path, engine: TrainingEngine, ema: EMA, state: dict,
                    asynchronous: bool = False) -> Written:
    return engine.save(directory, ema.state_dict(), state, asynchronous)


def restore(path: Path | None, engine: TrainingEngine, ema: EMA, stateful: dict) -> int:
    """Load the newest intact checkpoint ``path`` (None: a fresh run); the step to continue
    from. Whether it loads at another mesh is the engine's (native: any mesh)."""
    if path is None:
        return 0
    state = engine.load(path, ema.state_dict())
    for name, obj in stateful.items():
        if name == "early_stop" and name not in state:
            continue  # early stopping turned on at this resume: it starts watching now
        obj.load_state_dict(state[name])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]


def start_parallel(cfg: TrainConfig) -> ParallelContext:
    dims = check_parallel_fits(cfg, read_launch_env().world_size)
    return init_parallel(dims, torch.device(cfg.trainer.device).type,
                         cfg.parallel.timeout_minutes)


def start_precision(cfg: TrainConfig, ctx: ParallelContext) -> ResolvedPrecision:
    """Resolve the run's precision on this rank's device (the mesh decides whether FSDP,
    and so parallel.param_dtype, acts) and apply its TF32 switch."""
    sharded = cfg.parallel.engine is not Engine.fsdp2 or needs_fsdp(ctx)  # ZeRO shards
    precision = resolve_precision(cfg, ctx.device, sharded)
    apply_tf32(precision, ctx.device)
    return precision


def train(cfg: TrainConfig, run_dir: Path, config_dict: dict) -> bool:
    """Train to ``trainer.max_steps`` (or an early stop); True if a preemption signal
    stopped the run after checkpointing (the caller exits with the requeue code)."""
    check_start(cfg)
    ctx = start_parallel(cfg)
    precision = start_precision(cfg, ctx)
    lock = RunDirLock(run_dir).acquire(ctx.is_main)  # before anything in it is written
    preemption = PreemptionFlag(ctx.device)  # from here a signal checkpoints, not kills
    torch.manual_seed(cfg.trainer.seed)
    # checkpoints store python's RNG too: seeded, a resumed run's state equals an
    # uninterrupted one's instead of each launch's own OS entropy
    random.seed(cfg.trainer.seed)
    task = build_task(cfg, ctx)
    model = task.build_model()
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.trainer.keep_last)
    resume_from = checkpointer.latest()
    # before any weight is read: a changed width would fail deep inside DCP, a lower depth
    # would load a subset of the weights silently
    changes = check_resume(cfg, resume_from)
    run_config = launch_metadata(cfg)  # stored with every checkpoint
    # before the engine (a ZeRO engine partitions the weights it is given) and the EMA
    initialise_from(cfg, model, resume_from, ctx.is_main)
    engine = build_engine(cfg, model, ctx)
    ema = EMA(engine.ema_tensors(), cfg.recipe.ema_decay, engine.release_params)
    batches = build_train_batches(cfg, build_datasets(cfg.data)[0], ctx)
    val_batches = build_val_batches(cfg)
    guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
    step_log = StepLog(guard)
    stateful = {"scheduler": engine.scheduler, "data": batches, "guard": guard}
    stopper = EarlyStopping(cfg.recipe.early_stop)
    if stopper.enabled:
        stateful["early_stop"] = stopper
    step = restore(resume_from, engine, ema, stateful)
    if changes:
        config_dict = {**config_dict, "resume_changes": changes}
    monitor = Monitor(cfg, run_dir, config_dict, step, enabled=ctx.is_main)
    if changes:
        monitor.write(f"resumed with changed settings: {'; '.join(changes)}")
    monitor.write(f"{engine.num_trainable():,} trainable parameters; {task.describe()}; "
                  f"mesh {ctx.dims}; run dir {run_dir}")
    monitor.write(precision.describe())
    data_iter = iter(batches)
    preempted = False
    if stopper.stopped:
        monitor.write(f"the run stopped early at step {step} (best: step {stopper.best_step}, "
                      f"see {run_dir / 'best.json'}); nothing left to train")
    while step < cfg.trainer.max_steps and not stopper.stopped:
        with monitor.waiting_for_data():
            batch = next(data_iter)
        step += 1
        values = train_step(cfg, step, batch, engine, task, ema, ctx)
        # every replica's batch counted at this rank's shape: exact for map-style data;
        # shard buckets may differ between replicas
        values["tokens"] = task.tokens(batch) * ctx.dp_size
        values |= {f"skipped_{reason}": count
                   for reason, count in getattr(batches, "skipped", {}).items()}
        step_log.add(step, values)
        last = step == cfg.trainer.max_steps
        if reads_host(cfg, step):
            # The step values' one host read. Every rank reads at the same steps, so the
            # preemption vote (one scalar all-reduce) rides along: all stop at one step.
            raised, = step_log.read(lambda at, record: monitor.log_train_step(at, **record),
                                    preemption.raised())
            preempted = bool(raised) and not last
        improved = False  # with early stopping: the best validation so far, checkpointed
        if (step % cfg.trainer.val_every == 0 or last) and val_batches is not None:
            val = log_validation(task, step, model, ema, val_batches, monitor, ctx)
            improved = val is not None and on_validation(cfg, step, val, engine.scheduler,
                                                         stopper, ctx, monitor)
            last = last or stopper.stopped
        if step % cfg.trainer.sample_every == 0 or last:
            with ema.swapped_in():
                task.show(step, run_dir, model, monitor)
        if step % cfg.trainer.ckpt_every == 0 or last or improved or preempted:
            checkpointer.keep_steps = stopper.keep_steps()
            saved = checkpointer.save(step, with_run_config(partial(
                save_checkpoint, engine=engine, ema=ema, state=trainer_state(step, stateful),
                asynchronous=cfg.trainer.async_checkpoint), run_config, ctx.is_main))
            if improved:
                checkpointer.wait()  # best.json names only a published checkpoint
                stopper.publish(run_dir, saved, cfg.recipe.val_metric, ctx.is_main)
        if preempted:
            monitor.write(f"preempted: checkpointed step {step}; exiting with code "
                          f"{REQUEUE_EXIT_CODE} so the job is requeued")
            break
    checkpointer.wait()
    preemption.close()
    lock.release()
    monitor.close()
    shutdown(ctx)
    return preempted


register_configs()


def exit_failed_rank() -> None:
    """End this rank now, with the traceback logged. A rank fails most often because a
    peer died inside a collective; Python's normal exit then waits on threads and process
    group teardown blocked on that peer (seen: survivors of a rank killed mid-checkpoint
    sat there until torchrun SIGKILLed them). Checkpoints are published by an atomic
    rename, so nothing half-written survives the hard exit."""
    logging.getLogger(__name__).exception("rank %s failed; exiting without cleanup",
                                          os.environ.get("RANK", "?"))
    logging.shutdown()
    os._exit(1)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        preempted = train(to_train_config(cfg), run_dir, config_dict)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    except RunDirInUse as error:
        raise SystemExit(str(error)) from None
    except Exception:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_failed_rank()
        raise
    if preempted:
        raise SystemExit(REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    main()
