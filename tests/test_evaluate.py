"""``trainer.evaluate`` on a tiny trained run: the table has every column, a wandb offline
run, and the same numbers twice for the same seed; its Fréchet distance, feature
extractors and peak-memory probe on their own."""

import glob
import json
import subprocess

import numpy as np
import pytest
import torch
from scipy import linalg

from models.autoencoder import IdentityAutoencoder
from tests.conftest import ROOT, python_cmd
from tests.distributed import run_distributed
from tests.test_pixel_loss import tiny_tae
from tests.test_train_e2e import QUIET, train_cmd
from trainer.block_cache_calibration import main as block_calibrate_main
from trainer.config import ConfigError
from trainer.evaluate import COLUMNS, EvaluateConfig, evaluate, table_name
from trainer.frechet import feature_extractor, frechet_distance
from trainer.linear_guidance import main as calibrate_main
from trainer.peak_memory import PeakMemory
from trainer.run_config import parse_cli_options
from trainer.sample import SampleConfig, sample_traced
from trainer.sampling import Cache, Guidance

OPTIONS = ["guidance=adaptive", "gamma=0.5", "steps=3", "reference_steps=4", "prompts=4",
           "batch=3", "seed=7"]
TIMINGS = ("seconds_per_video", "peak_memory_mib")
DEPTH = 2  # the trained run's model.depth (tests.test_train_e2e.TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    result = subprocess.run(train_cmd(run_dir, "trainer.max_steps=30", *QUIET), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def without_timings(table):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in table["rows"]]


def test_cli_writes_every_column_and_repeats_its_numbers(trained, tmp_path):
    result = subprocess.run(python_cmd("trainer.evaluate", f"checkpoint={trained}", *OPTIONS,
                                       f"output_dir={tmp_path / 'cli'}", "wandb=offline"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    opts = EvaluateConfig(checkpoint=str(trained), guidance=Guidance.adaptive, gamma=0.5,
                          steps=3, reference_steps=4, prompts=4, batch=3, seed=7)
    name = table_name(opts)
    first = json.loads((tmp_path / "cli" / f"{name}.json").read_text())
    markdown = (tmp_path / "cli" / f"{name}.md").read_text()
    assert all(title in markdown for _, title, _ in COLUMNS)
    assert "random projection" in first["features"] and first["memory"].startswith("CPU")
    assert glob.glob(str(tmp_path / "cli" / "wandb" / "offline-run-*" / "run-*.wandb"))

    reference, cfg, adaptive, real = first["rows"]
    assert [reference["nfe_per_video"], cfg["nfe_per_video"]] == [8.0, 6.0]
    for row in (reference, cfg, adaptive):
        assert all(row[key] is not None for key in (
            "nfe_per_video", "seconds_per_video", "peak_memory_mib", "colour", "shape",
            "direction", "speed", "frechet"))
    for row in (cfg, adaptive):
        assert row["psnr_db"] > 0 and 0 < row["ssim"] <= 1
    assert cfg["psnr_vs_same_steps_cfg_db"] is None
    assert adaptive["psnr_vs_same_steps_cfg_db"] > 0
    # NFE per video is the steps plus the guided steps of each video
    switches = adaptive["switch_steps"]
    assert len(switches) == 4 and adaptive["nfe_per_video"] == np.mean(
        [3 + (s if s >= 0 else 3) for s in switches])
    assert adaptive["switched_fraction"] == np.mean([s >= 0 for s in switches])
    assert real["sampler"] == "held-out real clips" and real["colour"] == 1.0

    opts.output_dir, opts.wandb = str(tmp_path / "again"), "disabled"
    second = evaluate(opts)
    assert without_timings(second) == without_timings(first)


def test_sample_and_evaluate_take_adaptive_and_calibrated_linear_guidance(trained, tmp_path,
                                                                         capsys):
    _, traces = sample_traced(SampleConfig(checkpoint=str(trained), prompt="a red square",
                                           steps=3, guidance=Guidance.adaptive, gamma=-1.0,
                                           output_dir=str(tmp_path / "videos")))
    assert traces[0].nfe.tolist() == [4] and traces[0].switch_step.tolist() == [1]
    opts = EvaluateConfig(checkpoint=str(trained), guidance=Guidance.linear_ag, gamma=1.5,
                          steps=3, reference_steps=4, prompts=2, batch=2, wandb="disabled",
                          output_dir=str(tmp_path / "linear"))
    with pytest.raises(ConfigError, match="linear_ag_steps3_scale5.json, which is missing"):
        evaluate(opts)
    calibrate_main([f"checkpoint={trained}", "steps=3", "scale=5", "prompts=2"])
    assert "1 of 3 unconditional passes predicted" in capsys.readouterr().out
    linear = evaluate(opts)["rows"][2]
    assert linear["sampler"].startswith("linear_ag") and linear["nfe_per_video"] == 5.0


def test_sample_and_evaluate_take_a_block_cache(trained, tmp_path, capsys):
    _, traces = sample_traced(SampleConfig(checkpoint=str(trained), prompt="a red square",
                                           steps=3, cache=Cache.teacache, cache_threshold=1e9,
                                           output_dir=str(tmp_path / "videos")))
    assert traces[0].nfe.tolist() == [6] and traces[0].block_evaluations.tolist() == [
        2 * DEPTH]  # both CFG rows run every block at step 0 only
    opts = EvaluateConfig(checkpoint=str(trained), cache=Cache.block, cache_threshold=1e9,
                          steps=3, reference_steps=4, prompts=2, batch=2, wandb="disabled",
                          output_dir=str(tmp_path / "block"))
    with pytest.raises(ConfigError, match="block_steps3_scale5.json, which is missing"):
        evaluate(opts)
    block_calibrate_main([f"checkpoint={trained}", "steps=3", "scale=5", "prompts=2"])
    assert f"{DEPTH} blocks, 3 steps, 2 prompts" in capsys.readouterr().out
    _, cfg, cached, _ = evaluate(opts)["rows"]
    assert cfg["block_evaluations_per_video"] == 2 * 3 * DEPTH
    assert cached["sampler"].startswith("cfg + block cache") and cached["nfe_per_video"] == 6
    assert cached["block_evaluations_per_video"] == 2 * DEPTH
    assert cached["psnr_vs_same_steps_cfg_db"] > 0


def test_a_run_without_a_tae_has_no_autoencoder_features_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="features=autoencoder needs a run with a trained"):
        feature_extractor("autoencoder", IdentityAutoencoder())
    with pytest.raises(ConfigError, match="features='pixels' is none of"):
        feature_extractor("pixels", IdentityAutoencoder())
    with pytest.raises(ConfigError, match="features=tests.nowhere:f: cannot load"):
        feature_extractor("tests.nowhere:f", IdentityAutoencoder())
    with pytest.raises(ConfigError, match="reference_steps=1 must be >= 2"):
        EvaluateConfig(checkpoint="x", reference_steps=1)
    assert "random projection" in feature_extractor("auto", IdentityAutoencoder()).label


def mean_colour(videos):
    return videos.mean(dim=(2, 3, 4))


def test_a_user_extractor_and_the_random_projection_are_deterministic():
    user = feature_extractor("tests.test_evaluate:mean_colour", IdentityAutoencoder())
    videos = torch.rand(5, 3, 4, 16, 16) * 2 - 1
    assert "user extractor" in user.label
    torch.testing.assert_close(user.features(videos), videos.mean(dim=(2, 3, 4)))
    first = feature_extractor("random_projection", IdentityAutoencoder()).features(videos)
    again = feature_extractor("random_projection", IdentityAutoencoder()).features(videos)
    assert first.shape == (5, 64) and torch.equal(first, again)


def test_a_run_with_a_tae_gets_its_encoder_features_by_default():
    tae = tiny_tae()
    extractor = feature_extractor("auto", tae)
    videos = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    features = extractor.features(videos)
    assert "TAE encoder" in extractor.label
    assert features.shape == (3, 2 * tae.latent_channels)
    latent = tae.encode(videos[1:2]).flatten(2).double()
    torch.testing.assert_close(features[1], torch.cat([latent.mean(2), latent.std(2)], 1)[0],
                               rtol=1e-5, atol=1e-6)  # batch of 3 against 1: fp32 rounding


def test_frechet_distance_matches_the_scipy_formula():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(30, 6, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    mean_a, mean_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = (((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shift = torch.tensor([1.0, 0, 2, 0, 0, 0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="two"):
        frechet_distance(a[:1], b)


def test_peak_memory_sees_an_allocation():
    memory = PeakMemory(torch.device("cpu"))
    if not memory.label.startswith("CPU"):
        pytest.skip(memory.label)
    with memory.measure() as peak:
        block = torch.ones(16 * 2 ** 20)  # 64 MiB, every page touched
        del block
    assert peak.mib >= 60


def evaluate_options(trained, output_dir, *overrides: str) -> EvaluateConfig:
    return parse_cli_options(EvaluateConfig, [
        f"checkpoint={trained}", "steps=3", "reference_steps=4", "prompts=4", "batch=2",
        "seed=7", "cache=first_block", "cache_threshold=1e-3", "wandb=disabled",
        f"output_dir={output_dir}", *overrides], "trainer.evaluate", "")


def evaluate_on_mesh(trained, output_dir: str) -> dict:
    return evaluate(evaluate_options(trained, output_dir, "parallel.cp=2"))


def test_evaluate_on_a_mesh_writes_the_one_process_table(trained, tmp_path):
    single = evaluate(evaluate_options(trained, tmp_path / "single"))
    per_rank = run_distributed(evaluate_on_mesh, 2, trained, str(tmp_path / "mesh"))
    for table in per_rank:
        assert len(table["rows"]) == len(single["rows"]) == 4
        for row, expected in zip(without_timings(table), without_timings(single), strict=True):
            assert row.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, float):  # PSNR, SSIM, Fréchet: fp32 rounding apart
                    assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
                else:  # sampler names, NFE and block counts, judge rates
                    assert row[key] == value, key
    assert single["rows"][2]["sampler"].startswith("cfg + first_block cache")
    written = sorted(p.name for p in (tmp_path / "mesh").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())  # rank 0's
