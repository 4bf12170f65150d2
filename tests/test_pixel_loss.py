"""Pixel-space post-training (``recipe.pixel_loss``, arXiv 2409.17565): the derivation under
our flow, closed forms through a linear decoder, gradients through the frozen TAE decoder,
the frame window and crop, the memory switches, the config errors, and every mesh equal
to one process."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.autoencoder import IdentityAutoencoder
from models.flow import FlowMatching
from models.pixel_loss import (
    decoded_pair,
    draw_windows,
    noisy_latent_error,
    pixel_space_loss,
    take_windows,
)
from models.tae import TemporalAutoencoder
from tests.conftest import compose_train
from tests.distributed import run_distributed
from tests.test_parallel_equivalence import relative_error, run_steps
from trainer.config import ConfigError, PixelLossConfig, PixelTarget, Precision
from trainer.draws import StepDraws
from trainer.pixel_loss import PixelSpaceLoss, check_pixel_loss_fits
from trainer.run_config import CONF_DIR


def tiny_tae(seed: int = 1) -> TemporalAutoencoder:
    """The tae_tiny architecture with random weights, temporal layers included (a fresh
    TAE's temporal layers are identities): a frozen random decoder tests the math."""
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "autoencoder" / "tae_tiny.yaml"))
    fields.pop("defaults")
    tae = TemporalAutoencoder(**fields)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tae.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return tae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tae_file(tmp_path_factory):
    """A tiny TAE in the export format (its state dict as safetensors)."""
    path = tmp_path_factory.mktemp("tae") / "tae.safetensors"
    save_file(tiny_tae().state_dict(), str(path))
    return path


def draws(shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x0, x1, v_hat = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    return x0, x1, torch.rand(shape[0], generator=generator, dtype=dtype), v_hat


def expand(t, like):
    return t.reshape(-1, *[1] * (like.dim() - 1))


@pytest.mark.parametrize("sigma_min", [1e-5, 0.1, 0.0])
def test_rebuilt_latent_is_the_papers_with_predicted_noise(sigma_min):
    """x̃_t = t·x1 + (1 − c·t)·x̂0 with x̂0 = x_t − t·v̂ equals x_t − t(1 − ct)(v̂ − v),
    → x_t − t(1 − t)(v̂ − v) at σmin = 0; x̂1 = c·x_t + (1 − ct)·v̂, x_t + (1 − t)·v̂ at 0."""
    flow = FlowMatching(sigma_min=sigma_min)
    x0, x1, t, v_hat = draws((3, 4, 2, 3, 3), dtype=torch.float64)
    c, tt = 1 - sigma_min, expand(t, x1)
    x_t, v = flow.interpolate(x0, x1, t), flow.target(x0, x1)
    torch.testing.assert_close(x_t, x0 + tt * v)  # the identity the derivation rests on
    torch.testing.assert_close(flow.predicted_noise(x_t, v, t), x0)
    torch.testing.assert_close(flow.predicted_data(x_t, v, t), x1)
    reference, rebuilt = decoded_pair(flow, x0, x1, t, v_hat, "noise")
    papers = flow.interpolate(flow.predicted_noise(x_t, v_hat, t), x1, t)
    torch.testing.assert_close(reference, x_t)
    torch.testing.assert_close(rebuilt, papers)
    torch.testing.assert_close(rebuilt - x_t, -tt * (1 - c * tt) * (v_hat - v))
    clean, estimate = decoded_pair(flow, x0, x1, t, v_hat, "clean")
    torch.testing.assert_close(clean, x1)
    torch.testing.assert_close(estimate - x1, (1 - c * tt) * (v_hat - v))
    if sigma_min == 0.0:
        torch.testing.assert_close(rebuilt - x_t, -tt * (1 - tt) * (v_hat - v))
        torch.testing.assert_close(estimate, x_t + (1 - tt) * v_hat)


def identity_loss(target: str, **window) -> tuple[PixelSpaceLoss, FlowMatching]:
    flow = FlowMatching()
    cfg = PixelLossConfig(weight=1.0, target=PixelTarget(target), **window)
    return PixelSpaceLoss(cfg, IdentityAutoencoder(space_to_depth=2), flow), flow


@pytest.mark.parametrize("target", ["noise", "clean"])
@pytest.mark.parametrize("window", [{}, {"frames": 1, "crop": [4, 2]}])
def test_linear_decoder_gives_the_latent_closed_form(target, window):
    """The identity autoencoder is a permutation: the pixel loss is the mean of
    (t(1 − ct)(v̂ − v))² (noise) or ((1 − ct)(v̂ − v))² (clean) over the decoded window."""
    pixel, flow = identity_loss(target, **window)
    x0, x1, t, v_hat = draws((3, 12, 2, 3, 4))
    loss = pixel(x0, x1, t, v_hat, StepDraws(5, 1), slice(0, 3))
    c, tt = 1 - flow.sigma_min, expand(t, x1)
    factor = (tt if target == "noise" else 1) * (1 - c * tt)
    error = factor * (v_hat - flow.target(x0, x1))
    size = pixel.window(tuple(x1.shape[2:]))
    starts = StepDraws(5, 1).per_sample("pixel_window", slice(0, 3), lambda g: draw_windows(
        g, 1, tuple(x1.shape[2:]), size))
    expected = torch.mean(take_windows(error, starts, size) ** 2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert 0 < loss


def test_loss_is_zero_for_the_exact_prediction():
    decoder = tiny_tae()
    flow = FlowMatching()
    x0, x1, t, _ = draws((2, 8, 2, 3, 2))
    v = flow.target(x0, x1)
    reference, rebuilt = decoded_pair(flow, x0, x1, t, v, "noise")
    assert pixel_space_loss(decoder.decode, reference, rebuilt) == 0  # exactly
    clean, estimate = decoded_pair(flow, x0, x1, t, v, "clean")
    assert pixel_space_loss(decoder.decode, clean, estimate) < 1e-10  # fp32 rounding
    assert noisy_latent_error(v, v, t, flow.sigma_min).abs().max() == 0


def test_gradient_through_the_decoder_is_exact():
    """Autograd through the frozen TAE decoder equals finite differences (float64)."""
    decoder = tiny_tae().double()
    flow = FlowMatching()
    x0, x1, t, v_hat = draws((1, 8, 2, 2, 2), dtype=torch.float64)

    def loss(velocity):
        return pixel_space_loss(decoder.decode, *decoded_pair(flow, x0, x1, t, velocity))

    assert torch.autograd.gradcheck(loss, (v_hat.requires_grad_(),), eps=1e-6, atol=1e-7)


def tae_overrides(tae_file, *pixel: str) -> list[str]:
    """The DiT on the tiny TAE's latents: 12 x 24 x 8 px -> 3 x 6 x 2 latent, 9 tokens."""
    return ["experiment=t2v_tiny", "autoencoder=tae_tiny", f"autoencoder.checkpoint={tae_file}",
            "model.in_channels=8", "model.width=32", "model.depth=2", "model.heads=4",
            "model.ffn_dim=48", "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
            "text.encoders.byte.ffn_dim=48", "model=dit_tiny", "data.frames=12", "data.height=24",
            "data.width=8", "recipe.batch_size=4", "trainer.wandb.mode=disabled",
            *[f"recipe.pixel_loss.{setting}" for setting in pixel]]


def task_and_model(overrides):
    from trainer.build import single_process
    from trainer.t2v_task import TextToVideoTask

    cfg = compose_train(overrides)
    task = TextToVideoTask(cfg, single_process(torch.device("cpu")))
    return task, task.build_model()


def video_batch(seed=0, shape=(4, 3, 12, 24, 8)):
    video = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"video": video, "caption": ["a red square", "a blue circle", "", "a dot"]}


def test_gradients_reach_the_dit_through_the_frozen_decoder(tae_file):
    from trainer.objective import latent_flow_loss

    task, model = task_and_model(tae_overrides(tae_file, "weight=8"))
    # the DiT's output layer starts at zero (adaLN-zero): give it a prediction to correct
    with torch.no_grad():
        for param in model.dit.final.parameters():
            param.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    rows, batch = slice(0, 4), video_batch()
    loss, metrics = task.loss(model, batch, StepDraws(3, 1), rows, 4, 1)
    assert loss.item() == pytest.approx(metrics["latent_loss"].item()
                                        + 8 * metrics["pixel_loss"].item(), rel=1e-6)
    # the pixel term alone, on the same draws: its gradient goes through D only
    draws, drawn = StepDraws(3, 1), []
    x1, text = task.latents_and_text(batch)
    latent_flow_loss(model, task.flow, x1, text, draws, task.cfg.recipe.caption_dropout,
                     on_prediction=lambda *d: drawn.append(d))
    pixel = task.pixel_loss(*drawn[0], draws, rows)
    assert torch.equal(pixel, metrics["pixel_loss"])
    model.zero_grad()
    pixel.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(g.isfinite().all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("dit.blocks."))
    assert all(p.grad is None and not p.requires_grad for p in task.autoencoder.parameters())


def test_weight_zero_is_plain_training_bitwise(tae_file):
    """weight 0 draws and decodes nothing; weight > 0 leaves the latent term's draws as
    they were (the window is drawn after them)."""
    plain = tae_overrides(tae_file)
    runs = {}
    for name, pixel in (("plain", []), ("zero", ["weight=0", "frames=1", "crop=[8,8]"]),
                        ("on", ["weight=8", "frames=1", "crop=[8,8]"])):
        task, model = task_and_model(plain + [f"recipe.pixel_loss.{s}" for s in pixel])
        assert (task.pixel_loss is None) == (name != "on")
        loss, metrics = task.loss(model, video_batch(), StepDraws(3, 1), slice(0, 4), 4, 1)
        loss.backward()
        runs[name] = (loss, metrics, [p.grad.clone() for p in model.parameters()
                                      if p.grad is not None])
    assert torch.equal(runs["zero"][0], runs["plain"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["zero"][2], runs["plain"][2], strict=True))
    assert torch.equal(runs["on"][1]["latent_loss"], runs["plain"][0])


def test_window_is_drawn_from_the_generator_and_only_it_contributes():
    decoder, flow = tiny_tae(), FlowMatching()
    cfg = PixelLossConfig(weight=1.0, frames=1, crop=[8, 4])
    pixel = PixelSpaceLoss(cfg, decoder, flow)
    x0, x1, t, v_hat = draws((4, 8, 3, 4, 2))
    size = tuple(x1.shape[2:])
    assert pixel.window(size) == (1, 2, 1)
    starts = StepDraws(9, 1).per_sample("pixel_window", slice(0, 4),
                                        lambda g: draw_windows(g, 1, size, (1, 2, 1)))
    assert len({tuple(s) for s in starts.tolist()}) > 1  # a box per sample
    v_hat.requires_grad_()
    loss = pixel(x0, x1, t, v_hat, StepDraws(9, 1), slice(0, 4))
    (grad,) = torch.autograd.grad(loss, v_hat)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    for i, (a, b, c) in enumerate(starts.tolist()):
        inside[i, :, a:a + 1, b:b + 2, c:c + 1] = True
    assert grad[~inside].abs().max() == 0 and (grad[inside] != 0).all()
    # data-parallel halves draw their samples' boxes: their mean is the whole loss
    halves = [pixel(x0[rows], x1[rows], t[rows], v_hat[rows].detach(), StepDraws(9, 1), rows)
              for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss.detach())
    # more frames than the clip has: the clip is decoded whole
    assert PixelSpaceLoss(PixelLossConfig(weight=1.0, frames=5), decoder, flow).window(size) \
        == size


def keep(kept: list, tensor: torch.Tensor) -> torch.Tensor:
    kept.append(tensor)
    return tensor


def test_decoder_checkpointing_is_exact_and_bf16_is_close():
    flow = FlowMatching()
    x0, x1, t, v_hat = draws((2, 8, 2, 3, 2))
    results = {}
    for name, settings in (("plain", {}), ("checkpointed", {"checkpointing": True}),
                           ("bf16", {"dtype": Precision.bf16})):
        decoder = tiny_tae()
        pixel = PixelSpaceLoss(PixelLossConfig(weight=1.0, **settings), decoder, flow)
        velocity = v_hat.clone().requires_grad_()
        kept = []  # tensors saved for backward outside checkpointed blocks
        with torch.autograd.graph.saved_tensors_hooks(partial(keep, kept), lambda x: x):
            loss = pixel(x0, x1, t, velocity, StepDraws(0, 1), slice(0, 2))
        results[name] = (loss, torch.autograd.grad(loss, velocity)[0], len(kept))
        assert all(p.dtype == torch.float32 for p in decoder.parameters())  # encoder's copy
    for got, want in zip(results["checkpointed"][:2], results["plain"][:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert results["checkpointed"][2] < results["plain"][2] / 4  # the blocks keep their inputs
    loss, grad, _ = results["bf16"]
    assert loss.dtype == grad.dtype == torch.float32
    assert relative_error(loss, results["plain"][0]) < 0.05
    assert relative_error(grad, results["plain"][1]) < 0.1


def test_config_errors_name_the_key_and_the_fix(tae_file):
    identity = ["experiment=t2v_tiny", "trainer.wandb.mode=disabled", "recipe.pixel_loss.weight=8"]
    with pytest.raises(ConfigError, match=r"crop=\[3, 4\] is not a multiple .* compression 2"):
        task_and_model(identity + ["recipe.pixel_loss.crop=[3,4]"])
    with pytest.raises(ConfigError, match=r"crop=\[64, 8\] .* does not fit data "
                                          r"frames/height/width=8/32/32"):
        task_and_model(identity + ["recipe.pixel_loss.crop=[64,8]"])
    with pytest.raises(ConfigError, match="has no decode"):
        check_pixel_loss_fits(compose_train(identity), object())
    with pytest.raises(ConfigError, match=r"recipe.pixel_loss.weight=-1.0 must be a finite"):
        compose_train(["experiment=t2v_tiny", "recipe.pixel_loss.weight=-1"])
    with pytest.raises(ConfigError, match=r"recipe.pixel_loss.crop=\[8\] must be \[height, "):
        compose_train(["experiment=t2v_tiny", "recipe.pixel_loss.crop=[8]"])
    with pytest.raises(ConfigError, match="needs task=t2v"):
        compose_train(["experiment=tae_tiny", "recipe.pixel_loss.weight=1"])


# ------------------------------------------------------------------ meshes

def mesh_overrides(tae_file) -> list[str]:
    """On top of the equivalence tests' tiny DiT: the tiny TAE's latents (9 tokens: cp=2
    pads, tp's sequence shards are uneven) and a pixel loss on a 2-frame, 16 x 4 px window
    per sample with the decoder checkpointed."""
    return ["autoencoder=tae_tiny", f"autoencoder.checkpoint={tae_file}",
            "model.in_channels=8", "model=dit_tiny", "data.frames=12",
            "data.height=24", "data.width=8",
            "recipe.pixel_loss.weight=8", "recipe.pixel_loss.frames=2",
            "recipe.pixel_loss.crop=[16,4]", "recipe.pixel_loss.checkpointing=true"]


@pytest.fixture(scope="module")
def mesh_reference(tae_file):
    return run_steps(mesh_overrides(tae_file))


@pytest.mark.parametrize("mesh,world", [(["parallel.dp_shard=2"], 2),
                                        (["parallel.tp=2", "parallel.cp=2"], 4)],
                         ids=["fsdp2", "tp2_cp2"])
def test_pixel_loss_on_a_mesh_matches_one_process(mesh, world, tae_file, mesh_reference):
    """Loss of 3 steps, every gathered gradient, weights and EMA: relative error <= 1e-5."""
    for rank, result in enumerate(run_distributed(run_steps, world,
                                                  mesh_overrides(tae_file) + mesh)):
        for step, (loss, expected) in enumerate(zip(result["losses"],
                                                    mesh_reference["losses"], strict=True)):
            assert abs(loss - expected) <= 1e-5 * abs(expected), (rank, step + 1)
        assert result["grads"].keys() == mesh_reference["grads"].keys()
        for kind in ("grads", "weights", "ema"):
            for name, expected in mesh_reference[kind].items():
                error = relative_error(result[kind][name], expected)
                assert error <= 1e-5, f"rank {rank} {kind} {name}: relative error {error:.2e}"
