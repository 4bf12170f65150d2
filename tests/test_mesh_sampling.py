"""``trainer.sample`` on a mesh: tp2, cp2 in each CP mode, tp2×cp2 and CFG parallel sample
one process's videos (same seed, fp32 rounding) from a DCP checkpoint or a safetensors
export, each rank holding only its shards; rank 0 alone writes the mp4. A mesh that does
not fit the processes or the heads is refused naming the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.engine import local_tensor
from parallel.mesh import MeshDims, ParallelContext
from parallel.weights import SafetensorsWeights, shard_index
from tests.conftest import compose_train
from tests.distributed import run_distributed
from trainer.config import ConfigError, CPMode
from trainer.export import ExportConfig, export
from trainer.mesh_sampling import (
    SampleParallelConfig,
    SamplingSpeed,
    check_model_fits,
    load_on_mesh,
    sampling_dims,
)
from trainer.run_config import parse_cli_options
from trainer.sample import SampleConfig, main, sample_result
from trainer.train import train

TINY = ["model.depth=2", "model.width=32", "model.heads=4", "model.ffn_dim=64",
        "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=64", "model=dit_tiny", "data.frames=2",
        "data.height=8", "data.width=8",
        "data.num_samples=16", "data.num_workers=0", "data.val_samples=0", "data.judge_prompts=0",
        "recipe.batch_size=2", "trainer.max_steps=2", "trainer.sample_prompts=[]",
        "trainer.wandb.mode=disabled", "trainer.progress=false"]
# 7 frames of 12 x 4 pixels: 7 x 3 x 1 = 21 tokens, odd for tp and cp (cp pads to 22,
# each cp rank's 11 split 6 + 5 over tp)
SHAPE = ["frames=7", "height=12", "width=4"]
SAMPLING = ["prompt=a red square moving left", "steps=3", "guidance_scale=5.0", "seed=3",
            *SHAPE]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{"dcp": the run dir, "safetensors": its EMA export} of a 2-step tiny run."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_train(TINY), run_dir, {})
    exported = export(ExportConfig(checkpoint=str(run_dir),
                                   output=str(run_dir / "model.safetensors")))
    return {"dcp": str(run_dir), "safetensors": str(exported)}


def sampler_settings(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that are not the mesh: what one process must sample alike."""
    return tuple(o for o in overrides if not o.startswith("parallel."))


@pytest.fixture(scope="module")
def one_process(sources, tmp_path_factory):
    """sampler settings -> (videos, block evaluations per video) of one process."""
    found = {}
    for settings in {sampler_settings(o) for _, runs in MESHES.values() for _, o in runs}:
        result = sample_result(options(sources["dcp"], tmp_path_factory.mktemp("single"),
                                       *settings))
        found[settings] = (result.videos, [t.block_evaluations for t in result.traces])
    return found


def options(checkpoint: str, output_dir, *overrides: str) -> SampleConfig:
    return parse_cli_options(SampleConfig, [f"checkpoint={checkpoint}",
                                            f"output_dir={output_dir}", *SAMPLING,
                                            *overrides], "trainer.sample", "")


def sample_on_mesh(runs: list[tuple[str, str, list[str]]], shards_of: str | None) -> dict:
    """Each (checkpoint, output dir, overrides) sampled in turn on this rank's mesh (the
    process group stays, each sampling builds its own mesh); with ``shards_of``, also this
    rank's loaded shards of that checkpoint at tp2×cp2."""
    found = []
    for checkpoint, output_dir, overrides in runs:
        result = sample_result(options(checkpoint, output_dir, *overrides))
        found.append({"videos": result.videos, "paths": [str(p) for p in result.paths],
                      "blocks": [t.block_evaluations for t in result.traces],
                      "exchanged": result.speed.exchanged_bytes,
                      "tokens_per_second": result.speed.tokens_per_second_per_rank})
    return {"samplings": found, "shards": shards_of and local_shards(shards_of)}


def local_shards(checkpoint: str) -> dict:
    """This rank's loaded part of every parameter, with where it lies in the full one."""
    run, _ = load_on_mesh(checkpoint, SampleParallelConfig(tp=2, cp=2), "cpu", ema=True)
    return {name: (shard_index(param), local_tensor(param).detach().clone())
            for name, param in run.model.named_parameters()}


# Dynamic block caches at thresholds where this run's rows reuse some blocks and run others
# (first_block: 20 of 24 block evaluations, teacache 8): every cp rank must decide on the
# whole row's change, or the ranks' collectives fall out of step.
FIRST_BLOCK = ["cache=first_block", "cache_threshold=1e-4", "steps=6"]
TEACACHE = ["cache=teacache", "cache_threshold=1e-4", "steps=6"]
# mesh -> (processes, the samplings it runs: (source, overrides)); the meshes of one
# process count share one spawn
MESHES = {
    "tp2": (2, [("dcp", ["parallel.tp=2"])]),
    "cp2_allgather_kv": (2, [("dcp", ["parallel.cp=2", "parallel.cp_mode=allgather_kv"])]),
    "cp2_ulysses": (2, [("safetensors", ["parallel.cp=2", "parallel.cp_mode=ulysses"])]),
    "cp2_ring": (2, [("dcp", ["parallel.cp=2", "parallel.cp_mode=ring"])]),
    "cfg2": (2, [("dcp", ["parallel.cfg_parallel=true"])]),
    "cp2_first_block_cache": (2, [("dcp", ["parallel.cp=2", *FIRST_BLOCK])]),
    "tp2xcp2": (4, [("safetensors", ["parallel.tp=2", "parallel.cp=2",
                                     "parallel.cp_mode=ring"]),
                    ("dcp", ["parallel.tp=2", "parallel.cp=2",
                             "parallel.cp_mode=allgather_kv"])]),
    "tp2xcp2_teacache": (4, [("dcp", ["parallel.tp=2", "parallel.cp=2",
                                      "parallel.cp_mode=ring", *TEACACHE])]),
}


@pytest.fixture(scope="module")
def meshes(sources, tmp_path_factory) -> dict:
    """mesh -> (its output dirs, per rank: its samplings' results); the 4-process spawn
    also returns each rank's loaded shards of the export under "shards"."""
    found = {}
    for processes in sorted({processes for processes, _ in MESHES.values()}):
        names = [name for name, (count, _) in MESHES.items() if count == processes]
        runs, owner = [], []
        for name in names:
            for source, overrides in MESHES[name][1]:
                runs.append((sources[source], str(tmp_path_factory.mktemp(name)), overrides))
                owner.append(name)
        shards_of = sources["safetensors"] if processes == 4 else None
        per_rank = run_distributed(sample_on_mesh, processes, runs, shards_of)
        for name in names:
            mine = [i for i, who in enumerate(owner) if who == name]
            found[name] = ([runs[i][1] for i in mine],
                           [[rank["samplings"][i] for i in mine] for rank in per_rank])
        if shards_of:
            found["shards"] = [rank["shards"] for rank in per_rank]
    return found


@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_samples_the_one_process_video(mesh, meshes, one_process):
    output_dirs, per_rank = meshes[mesh]
    for rank, samplings in enumerate(per_rank):
        for result, (_, overrides) in zip(samplings, MESHES[mesh][1], strict=True):
            videos, blocks = one_process[sampler_settings(overrides)]
            error = (result["videos"] - videos).abs().max().item()
            assert error <= 1e-5, (rank, error)
            assert [b.tolist() for b in result["blocks"]] == [b.tolist() for b in blocks]
            if "steps=6" in overrides:  # cached: some blocks reused, more than step 0's run
                assert all(2 * 2 < b < 6 * 2 * 2 for b in blocks), blocks
            assert result["tokens_per_second"] > 0
            assert len(result["paths"]) == (1 if rank == 0 else 0)  # rank 0 writes
    for output_dir in output_dirs:
        written = list(Path(output_dir).glob("*.mp4"))
        assert len(written) == 1 and written[0].stat().st_size > 0
    if mesh == "cfg2":
        # per step one all-gather of one branch's (1, 12, 7, 6, 2) fp32 velocity
        assert [rank[0]["exchanged"] for rank in per_rank] == [3 * 12 * 7 * 6 * 2 * 4] * 2


def test_each_rank_loads_only_its_shard_of_the_exported_file(sources, meshes):
    full = SafetensorsWeights(sources["safetensors"])
    sharded = 0
    for shards in meshes["shards"]:
        assert shards.keys() == full.specs.keys()
        for name, (index, local) in shards.items():
            expected = full.read(name)
            if index is not None:
                expected = expected[index]
                sharded += 1
                assert local.numel() < full.specs[name][0].numel(), name
            assert torch.equal(local, expected), name
    assert sharded >= 4 * 2 * 8  # on every rank each block's q, k, v, wo, w1, w2, w3, ...


@pytest.mark.parametrize("par, world, message", [
    (SampleParallelConfig(tp=2, cp=2), 2,
     "2 processes launched but parallel.cp=2 × parallel.tp=2 = 4; launch 4"),
    (SampleParallelConfig(tp=2, cfg_parallel=True), 2,
     "2 processes launched but parallel.cfg_parallel (2) × parallel.cp=1 × parallel.tp=2 = 4"),
    (SampleParallelConfig(cp=0), 1, "parallel.cp=0 must be >= 1"),
])
def test_a_mesh_that_does_not_fit_the_processes_is_refused(par, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sampling_dims(par, world)


def test_a_mesh_that_does_not_fit_the_heads_is_refused():
    with pytest.raises(ConfigError, match="model.heads=4 is not divisible by parallel.tp=3"):
        check_model_fits(4, SampleParallelConfig(tp=3))
    with pytest.raises(ConfigError, match="ulysses needs model.heads=4 divisible by "
                                          "parallel.tp × parallel.cp = 2 × 4"):
        check_model_fits(4, SampleParallelConfig(tp=2, cp=4, cp_mode=CPMode.ulysses))
    check_model_fits(4, SampleParallelConfig(tp=2, cp=4, cp_mode=CPMode.ring))


def test_the_cli_refuses_a_mesh_for_one_process_before_reading_the_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="config error: 1 process launched but "
                                         "parallel.cp=2 × parallel.tp=1 = 2; launch 2"):
        main([f"checkpoint={tmp_path / 'missing'}", "prompt=x", "parallel.cp=2"])


def test_the_log_line_says_tokens_per_second_per_rank_and_the_cfg_bytes():
    ctx = ParallelContext(MeshDims(dp_replicate=2, dp_shard=1, cp=2, tp=2), 0, 8,
                          torch.device("cpu"))
    speed = SamplingSpeed(seconds=2.0, tokens=8000, ranks=8, exchanged_bytes=4032)
    assert speed.describe(1, ctx, "ring") == (
        "sampled 1 video in 2.00 s on 8 ranks (cfg 2 × cp 2 × tp 2, ring): 500 DiT "
        "tokens/s per rank, CFG branches exchanged 4,032 bytes per rank")
