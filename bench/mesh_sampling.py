"""Sampling on a mesh against one process: the same video, and DiT tokens/s per rank.

    python bench/mesh_sampling.py checkpoint=runs/exp_f16pt2 [steps=25 prompt="..."
        meshes=[tp2,cp2,tp2xcp2,cfg2] cp_mode=ring]

Runs ``trainer.sample``'s own path (``sample_result``: meta model, the training TP/CP
plan, each rank loading only its shards) in one process and on each mesh in gloo
processes on this machine's CPUs (``tests.distributed.run_distributed``), and prints one
row per mesh: processes, wall seconds, DiT tokens/s per rank, the largest difference of
the float video from the one process's (in [-1, 1]) and the bytes CFG parallel sent per
rank. The ranks share the machine's cores, so tokens/s per rank falls with the rank
count here; the row to read is the equality.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.distributed import run_distributed  # noqa: E402
from trainer.run_config import parse_cli_options  # noqa: E402
from trainer.sample import SampleConfig, sample_result  # noqa: E402

# mesh -> (processes, trainer.sample options)
MESHES = {"tp2": (2, ["parallel.tp=2"]), "cp2": (2, ["parallel.cp=2"]),
          "tp2xcp2": (4, ["parallel.tp=2", "parallel.cp=2"]),
          "cfg2": (2, ["parallel.cfg_parallel=true"]),
          "cfg2xtp2": (4, ["parallel.cfg_parallel=true", "parallel.tp=2"])}


@dataclass
class BenchConfig:
    checkpoint: str = MISSING
    prompt: str = "a red square moving left slowly"
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    cp_mode: str = "ring"
    meshes: list[str] = field(default_factory=lambda: ["tp2", "cp2", "tp2xcp2", "cfg2"])


def sampled(argv: list[str]) -> dict:
    """One sampling as ``trainer.sample`` would run it with ``argv``."""
    result = sample_result(parse_cli_options(SampleConfig, argv, "trainer.sample", ""))
    speed = result.speed
    return {"videos": result.videos, "seconds": speed.seconds, "ranks": speed.ranks,
            "tokens_per_second": speed.tokens_per_second_per_rank,
            "exchanged": speed.exchanged_bytes}


def row(name: str, found: list[dict], reference) -> str:
    error = max((rank["videos"] - reference).abs().max().item() for rank in found)
    first = found[0]
    return (f"| {name} | {first['ranks']} | {first['seconds']:.1f} | "
            f"{first['tokens_per_second']:,.0f} | {error:.2e} | {first['exchanged']:,} |")


def main(argv: list[str]) -> None:
    opts = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                               OmegaConf.from_cli(argv)))
    unknown = set(opts.meshes) - set(MESHES)
    if unknown:
        raise SystemExit(f"meshes {sorted(unknown)} are not among {sorted(MESHES)}")
    with tempfile.TemporaryDirectory() as output:
        common = [f"checkpoint={opts.checkpoint}", f"prompt={opts.prompt}",
                  f"steps={opts.steps}", f"guidance_scale={opts.guidance_scale}",
                  f"seed={opts.seed}", f"output_dir={output}",
                  f"parallel.cp_mode={opts.cp_mode}"]
        single = sampled(common)
        print("| mesh | processes | seconds | DiT tokens/s per rank | max abs diff vs 1 "
              "process | CFG bytes sent per rank |")
        print("|---|---|---|---|---|---|")
        print(row("one process", [single], single["videos"]))
        for name in opts.meshes:
            processes, overrides = MESHES[name]
            found = run_distributed(sampled, processes, [*common, *overrides], timeout=3600)
            print(row(name, found, single["videos"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
