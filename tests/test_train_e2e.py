"""The real CLI end to end: train, sample, kill -9 and resume, damaged checkpoints, sweeps."""

import glob
import json
import os
import signal
import subprocess
import time

import pytest
from PIL import Image

from data.contact_sheet import sheet_size
from data.video import read_video
from tests.conftest import ROOT, python_cmd

pytestmark = pytest.mark.slow

TINY = ["model.depth=2", "model.width=64", "model.heads=4", "model.ffn_dim=128",
        "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=128", "model=dit_tiny", "data.frames=4",
        "data.height=16", "data.width=16",
        "data.num_samples=2000", "data.val_samples=8", "recipe.batch_size=4",
        "recipe.warmup_steps=5", "recipe.lr=1e-3", "trainer.val_every=10",
        "trainer.val_batches=2", "trainer.sample_steps=4", "trainer.ckpt_every=5",
        "trainer.progress=false"]
QUIET = ["trainer.wandb.mode=disabled", "trainer.sample_prompts=[]"]


def train_cmd(run_dir, *overrides):
    return python_cmd("trainer.train", f"hydra.run.dir={run_dir}", *TINY, *overrides)


def run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train_losses(run_dir):
    """step -> loss, the last record of each step winning (a resumed run rewrites them)."""
    losses = {}
    for line in open(run_dir / "metrics.jsonl"):
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def test_train_lowers_loss_logs_wandb_and_samples(tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(run_dir, "trainer.max_steps=30", "trainer.sample_every=30",
                  "trainer.log_every=5", "trainer.keep_last=2", "data.judge_prompts=3",
                  "trainer.judge_steps=2",
                  "trainer.sample_prompts=[a red square moving left slowly,a blue circle]"))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(26, 31)]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, losses
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000025", "step_00000030"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    videos = sorted((run_dir / "samples" / "step_00000030").glob("*.mp4"))
    assert [v.name for v in videos] == ["00_a_red_square_moving_left_slowly.mp4",
                                        "01_a_blue_circle.mp4"]
    frames, fps = read_video(videos[0])
    assert tuple(frames.shape) == (4, 16, 16, 3) and fps == 8.0
    sheet = Image.open(run_dir / "samples" / "step_00000030" / "contact_sheet.png")
    assert sheet.size[::-1] == sheet_size(2, 4, 16, 16, scale=3)
    # validation judged samples of held-out captions: rates in [0, 1] at every validation
    validations = [json.loads(line) for line in open(run_dir / "metrics.jsonl")
                   if json.loads(line)["kind"] == "val"]
    assert [v["step"] for v in validations] == [10, 20, 30]
    for record in validations:
        for key in ("colour_match", "shape_match", "direction_match", "speed_match",
                    "colour_match_ema"):
            assert 0.0 <= record[key] <= 1.0, record

    # wandb: an offline run whose history holds the exact logged losses and the videos
    records = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(records) == 1
    history = open(records[0], "rb").read()
    for step in (1, 5, 10, 30):
        assert repr(losses[step]).encode() in history
    assert b"val/loss" in history and b"perf/tokens_per_s" in history
    assert b"val/shape_match" in history and b"contact_sheet" in history
    media = run_dir / "wandb" / "offline-run-*" / "files" / "media"
    assert glob.glob(str(media / "videos" / "*.mp4"))
    logged_sheets = glob.glob(str(media / "images" / "contact_sheet*.png"))
    assert len(logged_sheets) == 1 and Image.open(logged_sheets[0]).size == sheet.size

    out = tmp_path / "cli"
    result = run(python_cmd("trainer.sample", f"checkpoint={run_dir}",
                            "prompt=a red square moving left", "steps=6",
                            f"output_dir={out}", "fps=12"))
    path = result.stdout.strip().splitlines()[-1]
    frames, fps = read_video(path)
    assert tuple(frames.shape) == (4, 16, 16, 3) and fps == 12.0


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(train_cmd(reference, "trainer.max_steps=40", *QUIET))
    expected = train_losses(reference)

    process = subprocess.Popen(train_cmd(killed, "trainer.max_steps=40", *QUIET), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed), default=0) >= 17:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = max(train_losses(killed))
    assert process.returncode == -signal.SIGKILL and 17 <= done_before_kill < 40

    result = run(train_cmd(killed, "trainer.max_steps=40", *QUIET))
    assert "resumed from" in result.stdout
    assert train_losses(killed) == expected  # exact float equality, every step

    # Damage the newest checkpoint: the run falls back to the previous one and recomputes.
    shard = next((killed / "checkpoints" / "step_00000040" / "tensors").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    (killed / "metrics.jsonl").unlink()
    result = run(train_cmd(killed, "trainer.max_steps=40", *QUIET))
    assert "skipping damaged checkpoint" in result.stdout + result.stderr
    assert "step_00000035" in result.stdout
    assert train_losses(killed) == {s: expected[s] for s in range(36, 41)}


def test_multirun_sweep_trains_each_point(tmp_path):
    run(python_cmd("trainer.train", "--multirun", f"hydra.sweep.dir={tmp_path}/sweep",
                   *TINY, *QUIET, "trainer.max_steps=2", "model.depth=1,2"))
    for job, depth in (("0", 1), ("1", 2)):
        run_dir = tmp_path / "sweep" / job
        assert f"model.depth={depth}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert (run_dir / "checkpoints" / "step_00000002").is_dir()
