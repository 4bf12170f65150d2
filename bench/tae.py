"""The temporal autoencoder: reconstruction quality of a trained run, and encode/decode
throughput and peak memory, tiled against untiled.

Quality: a ``task=tae`` run's EMA weights (``trainer.trained.load_run``) reconstruct
held-out synthetic videos (the ``val`` split, never trained on) through the posterior
mean; PSNR and SSIM as in validation (``trainer.video_quality``), at the run's clip length
and twice that, with temporal tiles of two latent frames, tiled and untiled.

Speed and memory: one ``tae_tiny``-architecture TAE (random weights: speed does not depend
on them) encodes and decodes a clip of 32 or 128 frames at 256 or 768 px, each point in a
fresh process so its peak RSS (getrusage) is its own; the table gives frames/s and the
RSS growth over the process before the call. A point whose memory would pass
``--memory-limit-gib`` is reported as over the limit rather than run.

Run from the repository root (after ``make train``-style ``experiment=tae_tiny`` training):
    python bench/tae.py checkpoint=runs/tae_tiny
    python bench/tae.py checkpoint=runs/tae_tiny --quick   # 256 px only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import SyntheticVideos  # noqa: E402
from trainer.trained import load_run  # noqa: E402
from trainer.video_quality import psnr, ssim  # noqa: E402

SIZES, FRAMES = (256, 768), (32, 128)
# arXiv 2410.13720 §3 temporal tiles (32 frames, decoder overlap 16); spatial tiles at 768 px, the
# Movie Gen default, so neither size is cut in space and the comparison is temporal tiling
PAPER_TILES = {"tile_frames": 32, "decode_overlap_frames": 16, "spatial_tile_size": 768,
              "spatial_tile_overlap": 128}
CORES = 2


@torch.no_grad()
def quality(checkpoint: str, videos: int) -> tuple[list[dict], int]:
    run = load_run(Path(checkpoint), torch.device("cpu"))
    autoencoder, data = run.model.autoencoder, run.cfg.data
    # The synthetic shapes leave the frame after ~17 frames, so rather than longer clips
    # the tiles shrink to 2 latent frames (decoder overlap 1): clips then span 2-4 tiles.
    tc = autoencoder.temporal_compression
    autoencoder.cfg.tile_frames, autoencoder.cfg.decode_overlap_frames = 2 * tc, tc
    rows = []
    for frames in (data.frames, 2 * data.frames):
        held_out = SyntheticVideos(videos, frames, data.height, data.width, data.fps,
                                   data.seed, split="val")
        video = torch.stack([held_out[i]["video"] for i in range(videos)])
        for tiled in (False, True):
            latent = autoencoder.encode(video, tiled=tiled)
            recon = autoencoder.decode(latent, *video.shape[2:], tiled=tiled).clamp(-1, 1)
            rows.append({"frames": frames, "tiled": tiled,
                         "psnr": psnr(recon, video).mean().item(),
                         "ssim": ssim(recon, video).mean().item()})
    return rows, run.step


def measure_point(size: int, frames: int, tiled: bool, op: str) -> dict:
    """In a fresh process: one encode or decode; seconds and RSS growth."""
    from omegaconf import OmegaConf

    from models.tae import TAEConfig, TemporalAutoencoder
    from trainer.run_config import CONF_DIR

    torch.set_num_threads(CORES)
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "autoencoder" / "tae_tiny.yaml"))
    fields.pop("defaults")
    autoencoder = TemporalAutoencoder(**{**fields, **PAPER_TILES,
                                         "_target_": TAEConfig._target_}).eval()
    autoencoder.requires_grad_(False)
    video = torch.rand(1, 3, frames, size, size) * 2 - 1
    # drawn, not encoded: an encode here would set the peak RSS the decode is measured by
    latent = torch.randn(1, *autoencoder.latent_shape(frames, size, size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if op == "encode":
        autoencoder.encode(video, tiled=tiled)
    else:
        autoencoder.decode(latent, tiled=tiled)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "growth_mib": max(peak - before, 0) / 1024}


def estimated_gib(size: int, frames: int, tiled: bool) -> float:
    """Peak growth scales with pixels x frames per network call: measured 1.4 GiB for an
    untiled 256 px x 32-frame decode (0.9 GiB encode)."""
    frames = min(frames, PAPER_TILES["tile_frames"]) if tiled else frames
    return 1.4 * (size / 256) ** 2 * frames / 32


def speed_table(sizes, frame_counts, limit_gib: float) -> list[dict]:
    rows = []
    for size in sizes:
        for frames in frame_counts:
            for op in ("encode", "decode"):
                for tiled in (False, True):
                    row = {"size": size, "frames": frames, "op": op, "tiled": tiled}
                    estimate = estimated_gib(size, frames, tiled)
                    if estimate > limit_gib:
                        rows.append({**row, "skipped": f"~{estimate:.0f} GiB"})
                        continue
                    result = subprocess.run(
                        [sys.executable, __file__, "--point",
                         json.dumps([size, frames, tiled, op])],
                        capture_output=True, text=True, check=True)
                    point = json.loads(result.stdout.strip().splitlines()[-1])
                    rows.append({**row, **point, "fps": frames / point["seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", nargs="?", help="checkpoint=<task=tae run dir>")
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0)
    parser.add_argument("--point")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(*json.loads(args.point))))
        return
    if args.checkpoint:
        rows, step = quality(args.checkpoint.removeprefix("checkpoint="), args.videos)
        print(f"\nReconstruction of {args.videos} held-out synthetic videos, "
              f"{args.checkpoint} at step {step} (EMA weights)")
        print("| frames | tiled | PSNR (dB) | SSIM |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['frames']} | {r['tiled']} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    sizes = SIZES[:1] if args.quick else SIZES
    print(f"\nEncode/decode of one clip, tae_tiny architecture, {CORES} threads, fp32")
    print("| px | frames | op | tiled | frames/s | RSS growth (MiB) |\n|---|---|---|---|---|---|")
    for r in speed_table(sizes, FRAMES, args.memory_limit_gib):
        if "skipped" in r:
            print(f"| {r['size']} | {r['frames']} | {r['op']} | {r['tiled']} | "
                  f"not run | over the limit ({r['skipped']}) |")
        else:
            print(f"| {r['size']} | {r['frames']} | {r['op']} | {r['tiled']} | "
                  f"{r['fps']:.1f} | {r['growth_mib']:.0f} |")


if __name__ == "__main__":
    main()
