"""What a run reports: a progress bar, ``metrics.jsonl`` in the run dir, and a wandb run.

``metrics.jsonl`` gets every train step (losses as exact floats, so resumed runs can be
compared bitwise) and every validation/sampling event. wandb runs offline unless told
otherwise; its run id is kept in the run dir, so a resumed run continues the same run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.config import TrainConfig


class Monitor:
    """``enabled=False`` (every rank but 0) measures data wait but writes nothing."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, config_dict: dict[str, Any],
                 start_step: int, enabled: bool = True):
        self.run_dir = run_dir
        self.log_every = cfg.trainer.log_every
        self.jsonl = open(run_dir / "metrics.jsonl" if enabled else os.devnull, "a",
                          buffering=1)
        self.wandb_run = self._start_wandb(cfg, config_dict) if enabled else None
        self.bar = tqdm(total=cfg.trainer.max_steps, initial=start_step, dynamic_ncols=True,
                        disable=not (cfg.trainer.progress and enabled), desc=cfg.run_name)
        self.enabled = enabled
        self.data_wait = 0.0
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_tokens = 0

    def _start_wandb(self, cfg: TrainConfig, config_dict: dict[str, Any]):
        if cfg.trainer.wandb.mode.value == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=cfg.trainer.wandb.project, entity=cfg.trainer.wandb.entity,
                          name=cfg.run_name, id=id_file.read_text().strip(), resume="allow",
                          dir=str(self.run_dir), mode=cfg.trainer.wandb.mode.value,
                          config=config_dict)

    @contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - start

    def record(self, kind: str, step: int, **values: Any) -> None:
        """Append one event to metrics.jsonl."""
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def log_train_step(self, step: int, loss: float, tokens: int, **values: Any) -> None:
        """``tokens``: video tokens of the step's global batch."""
        self.record("train", step, loss=loss, **values)
        self.window_steps += 1
        self.window_tokens += tokens
        self.bar.update(1)
        if step % self.log_every and step != 1:
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        rates = {"steps_per_s": self.window_steps / elapsed,
                 "tokens_per_s": self.window_tokens / elapsed,
                 "data_wait_fraction": self.data_wait / elapsed}
        self.bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rates['steps_per_s']:.2f}",
                             tok_s=f"{rates['tokens_per_s']:.0f}")
        self.log_wandb({"train/loss": loss, **{f"train/{k}": v for k, v in values.items()},
                        **{f"perf/{k}": v for k, v in rates.items()}}, step)
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        self.window_tokens = 0

    def log_wandb(self, values: dict[str, Any], step: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_videos(self, paths: list[Path], prompts: list[str], step: int,
                   key: str = "samples") -> None:
        self.record(key, step, paths=[str(p) for p in paths], prompts=prompts)
        if self.wandb_run is not None:
            import wandb

            self.log_wandb({key: [wandb.Video(str(p), caption=c, format="mp4")
                                        for p, c in zip(paths, prompts, strict=True)]}, step)

    def log_image(self, path: str | Path, caption: str, step: int,
                  key: str = "contact_sheet") -> None:
        self.record(key, step, path=str(path))
        if self.wandb_run is not None:
            import wandb

            self.log_wandb({key: wandb.Image(str(path), caption=caption)}, step)

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
