"""Block caching (``models.block_cache``) on a tiny random DiT: threshold 0 is the plain
sampler bit for bit, every block output is either the block evaluated or its input plus
the residual of the block's last evaluation for that row, counts are exact, rows decide on
their own, the calibrated schedule follows the change curves alone, a bad calibration
file is refused naming it, and a tp2 or cp2 mesh caches exactly like one process."""

import json
from types import SimpleNamespace

import pytest
import torch

from models.block_cache import BlockCache, CacheSettings, block_schedule
from models.dit import DiT, DiTConfig
from models.sampler import GuidedVelocity, euler_sample, linear_quadratic_schedule
from tests.distributed import run_distributed
from tests.test_adaptive_guidance import PROMPTS, SCALE, STEPS, setup  # noqa: F401
from tests.test_linear_guidance import nudged
from trainer.block_cache_calibration import (
    block_calibration_path,
    cache_settings,
    calibrate_blocks,
    load_change_curves,
)
from trainer.config import ConfigError
from trainer.sampling import Cache, Guidance, generate_traced

DEPTH = 2  # the setup's model.depth


def run_cached(setup, settings, guidance="cfg", rows=slice(None), dit=None):  # noqa: F811
    """-> (latent after STEPS Euler steps, the cache, the guidance trace)."""
    model, _, _, (context, mask, null_context, null_mask), noise = setup
    dit = dit or model.dit
    velocity = GuidedVelocity(dit, context[rows], mask[rows], null_context[rows],
                              null_mask[rows], SCALE, guidance)
    cache = settings.new_cache()
    with cache.attached(dit):
        out = euler_sample(velocity, noise[rows], linear_quadratic_schedule(STEPS))
    return out, cache, velocity.trace()


def some_curves():
    return torch.linspace(0.01, 0.2, STEPS * DEPTH, dtype=torch.float64).view(STEPS, DEPTH)


@pytest.mark.parametrize("guidance", ["cfg", "none"])
def test_threshold_zero_is_the_plain_sampler_bitwise_and_counts_every_block(setup, guidance):  # noqa: F811
    model, _, _, text, noise = setup
    plain = euler_sample(GuidedVelocity(model.dit, *text, SCALE, guidance), noise,
                         linear_quadratic_schedule(STEPS))
    rows = 2 * len(PROMPTS) if guidance == "cfg" else len(PROMPTS)
    for settings in (CacheSettings("first_block", 0.0), CacheSettings("teacache", 0.0),
                     CacheSettings("block", 0.0, some_curves())):
        out, cache, _ = run_cached(setup, settings, guidance)
        assert torch.equal(out, plain), settings.mode
        assert cache.evaluations.tolist() == [STEPS * DEPTH] * rows
    assert not any("forward" in vars(block) for block in model.dit.blocks)  # detached


def test_generate_traced_counts_blocks_per_sample(setup):  # noqa: F811
    model, autoencoder, latent_shape, _, _ = setup
    _, trace = generate_traced(model, autoencoder, PROMPTS, latent_shape, STEPS, SCALE, 0)
    assert trace.block_evaluations.tolist() == [2 * STEPS * DEPTH] * len(PROMPTS)
    # TeaCache with a threshold never reached after step 0: only step 0's blocks run
    _, trace = generate_traced(model, autoencoder, PROMPTS, latent_shape, STEPS, SCALE, 0,
                               cache=CacheSettings("teacache", 1e9))
    assert trace.block_evaluations.tolist() == [2 * DEPTH] * len(PROMPTS)
    assert trace.nfe.tolist() == [2 * STEPS] * len(PROMPTS)


def test_the_schedule_accumulates_change_until_it_reaches_the_threshold():
    curves = torch.tensor([[float("nan"), float("nan")], [0.1, 0.3], [0.1, 0.0],
                           [0.3, 0.1], [0.05, 0.2]], dtype=torch.float64)
    runs = block_schedule(curves, 0.25)
    assert runs[:, 0].tolist() == [True, False, False, True, False]
    assert runs[:, 1].tolist() == [True, True, False, False, True]
    assert block_schedule(curves, 0.0).all() and not block_schedule(curves, 9.0)[1:].any()


def record_block_calls(dit):
    calls = []
    handles = [block.register_forward_hook(
        lambda module, args, out, index=index: calls.append((index, args, out)))
        for index, block in enumerate(dit.blocks)]
    return calls, handles


@pytest.mark.parametrize("mode,threshold", [("first_block", 0.05), ("first_block", 0.2),
                                            ("teacache", 0.3), ("block", 0.15)])
def test_every_block_output_is_evaluated_or_input_plus_its_last_residual(setup, mode,  # noqa: F811
                                                                         threshold):
    model, *_ = setup
    dit = model.dit
    settings = CacheSettings(mode, threshold, some_curves() if mode == "block" else None)
    calls, handles = record_block_calls(dit)
    try:
        _, cache, _ = run_cached(setup, settings)
    finally:
        for handle in handles:
            handle.remove()
    last, evaluated = {}, torch.zeros_like(cache.evaluations)
    with torch.no_grad():
        for index, args, out in calls:
            x = args[0]
            fresh = dit.blocks[index](*args)
            for row in range(len(x)):
                previous = last.get((index, row))
                if previous is not None and torch.equal(out[row], x[row] + previous):
                    continue  # reused
                torch.testing.assert_close(out[row], fresh[row], rtol=0, atol=1e-5)
                last[(index, row)] = out[row] - x[row]
                evaluated[row] += 1
    assert torch.equal(evaluated, cache.evaluations)
    assert (cache.evaluations < STEPS * DEPTH).any()  # the cache did skip blocks
    if mode == "block":
        assert cache.evaluations.tolist() == [int(block_schedule(some_curves(),
                                                                 threshold).sum())] * 4


def test_each_row_decides_on_its_own(setup):  # noqa: F811
    together = {}
    for threshold in (0.02, 0.05, 0.1, 0.2):
        out, cache, _ = run_cached(setup, CacheSettings("first_block", threshold))
        together[threshold] = out, cache.evaluations
    mixed = [t for t, (_, e) in together.items() if len(set(e.tolist())) > 1]
    assert mixed, "no threshold made the rows decide differently"
    out, evaluations = together[mixed[0]]
    for sample in range(len(PROMPTS)):
        alone, cache, _ = run_cached(setup, CacheSettings("first_block", mixed[0]),
                                     rows=slice(sample, sample + 1))
        torch.testing.assert_close(alone[0], out[sample], rtol=0, atol=1e-5)
        assert cache.evaluations.tolist() == evaluations[[sample, len(PROMPTS) + sample]].tolist()


def test_a_batch_whose_rows_change_and_bad_settings_are_refused(setup):  # noqa: F811
    model, _, _, (context, mask, _, _), noise = setup
    t = torch.zeros(2)
    with BlockCache("teacache", 0.1).attached(model.dit), torch.no_grad():
        model.dit(noise, t, context, mask)
        with pytest.raises(ValueError, match="brought 1 rows after 2.*guidance=cfg or none"):
            model.dit(noise[:1], t[:1], context[:1], mask[:1])
    with pytest.raises(ValueError, match="cache='fast' is not one of"):
        CacheSettings("fast", 0.1)
    with pytest.raises(ValueError, match="threshold=-0.1 must be a number >= 0"):
        CacheSettings("teacache", -0.1)
    with pytest.raises(ValueError, match="cache=block needs the calibration's change curves"):
        CacheSettings("block", 0.1)
    run = SimpleNamespace(model=model, run_dir=None)
    with pytest.raises(ConfigError, match="guidance=adaptive drops rows"):
        cache_settings(Cache.first_block, 0.1, Guidance.adaptive, run, STEPS, SCALE)
    with pytest.raises(ConfigError, match="cache_threshold=nan must be a number >= 0"):
        cache_settings(Cache.teacache, float("nan"), Guidance.cfg, run, STEPS, SCALE)


@pytest.fixture
def calibrated(setup, tmp_path):  # noqa: F811
    model, _, latent_shape, _, _ = setup
    run = SimpleNamespace(model=model, task=SimpleNamespace(latent_shape=latent_shape),
                          run_dir=tmp_path, step=7)
    record = calibrate_blocks(run, STEPS, SCALE, PROMPTS, seed=0, batch=1)
    path = block_calibration_path(tmp_path, STEPS, SCALE)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return run, path, record


def test_the_schedule_is_a_function_of_the_calibration_curves_only(setup, calibrated):  # noqa: F811
    run, path, record = calibrated
    curves = load_change_curves(path, run.model, STEPS, SCALE)
    assert curves.shape == (STEPS, DEPTH) and curves[0].isnan().all() and (curves[1:] > 0).all()
    settings = cache_settings(Cache.block, 0.2, Guidance.cfg, run, STEPS, SCALE)
    runs = block_schedule(curves, 0.2)
    assert 0 < runs.sum() < runs.numel()
    other = dict(record, run="elsewhere", seed=99, prompts=1, step=1)
    path.write_text(json.dumps(other))
    assert torch.equal(settings.new_cache().schedule,
                       cache_settings(Cache.block, 0.2, Guidance.cfg, run, STEPS,
                                      SCALE).new_cache().schedule)
    for sample in range(len(PROMPTS)):  # any prompt, any noise: the same blocks run
        _, cache, _ = run_cached(setup, settings, rows=slice(sample, sample + 1))
        assert cache.evaluations.tolist() == [int(runs.sum())] * 2


def test_a_missing_corrupt_mismatched_or_stale_calibration_file_is_refused(calibrated):
    run, path, record = calibrated
    model = run.model
    with pytest.raises(ConfigError, match=f"cache=block needs the calibration file "
                                          f"{path.parent / 'gone.json'}, which is missing.*"
                                          r"trainer.block_cache_calibration"):
        load_change_curves(path.parent / "gone.json", model, STEPS, SCALE)
    with pytest.raises(ConfigError, match=r"fitted for steps=8 scale=5, not steps=6 scale=5"):
        load_change_curves(path, model, 6, SCALE)
    for broken in ('{"format": "cinetron-block-cache/1", "chan',
                   json.dumps(record | {"format": "cinetron-linear-ag/1"}),
                   json.dumps(record | {"change": record["change"][:3]}),
                   json.dumps(record | {"change": [[None, None]] + [[0.1, -1.0]] * 7})):
        path.write_text(broken)
        with pytest.raises(ConfigError, match=f"{path} is corrupt"):
            load_change_curves(path, model, STEPS, SCALE)
    path.write_text(json.dumps(record))
    with nudged(model), pytest.raises(ConfigError, match=f"{path} is stale"):
        load_change_curves(path, model, STEPS, SCALE)


def tiny_dit() -> DiT:
    cfg = DiTConfig(width=32, depth=2, heads=2, ffn_dim=64, in_channels=4, patch_t=1,
                    max_patches_t=4, max_patches_h=8, max_patches_w=8, rope=True)
    dit = DiT(cfg)
    dit.init_weights(0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return dit.eval()


def mesh_cache_worker(cp: int, tp: int) -> dict:
    """Cached CFG on this rank's shard of a cp or tp mesh against the same in one process."""
    from parallel.mesh import MeshDims, init_parallel
    from parallel.parallelize import apply_context_parallel
    from parallel.tensor_parallel import apply_tensor_parallel

    ctx = init_parallel(MeshDims(dp_shard=1, cp=cp, tp=tp))
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 3, 6, 6, generator=generator)  # 27 tokens: uneven shards
    text = (torch.randn(2, 5, 32, generator=generator), torch.ones(2, 5, dtype=torch.bool),
            torch.randn(2, 5, 32, generator=generator), torch.ones(2, 5, dtype=torch.bool))
    sharded, sum_rows = tiny_dit(), None
    if tp > 1:
        apply_tensor_parallel(sharded, ctx.submesh("tp"))
    else:
        sum_rows = apply_context_parallel(sharded, ctx, "allgather_kv").row_sums
    results = {}
    for mode, threshold in (("first_block", 0.1), ("teacache", 0.3)):
        outs = []
        for dit, rows in ((tiny_dit(), None), (sharded, sum_rows)):
            cache = CacheSettings(mode, threshold, sum_rows=rows).new_cache()
            with cache.attached(dit), torch.no_grad():
                outs.append(euler_sample(GuidedVelocity(dit, *text, SCALE, "cfg"), noise,
                                         linear_quadratic_schedule(STEPS)))
            outs.append(cache.evaluations)
        results[mode] = outs
    return results


@pytest.mark.parametrize("cp,tp", [(2, 1), (1, 2)])
def test_a_sharded_model_caches_like_one_process(cp, tp):
    for rank in run_distributed(mesh_cache_worker, 2, cp, tp):
        for mode, (single, single_counts, sharded, sharded_counts) in rank.items():
            assert torch.equal(single_counts, sharded_counts), mode
            assert (single_counts < STEPS * DEPTH).any(), mode
            if mode == "first_block":  # its rows decided differently
                assert len(set(single_counts.tolist())) > 1
            torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-5)
