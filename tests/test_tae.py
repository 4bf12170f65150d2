import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.init import initial_value
from models.tae import TAEConfig, TemporalAutoencoder, ramp, tiled_apply
from models.tae_blocks import TemporalAttention, TemporalConv, TemporalDownsample
from models.tae_losses import (
    PatchDiscriminator,
    TAELossConfig,
    adaptive_gan_weight,
    discriminator_loss,
    generator_adversarial_loss,
    kl_loss,
    outlier_penalty_loss,
    tae_loss,
)
from tests.conftest import ROOT

# 8x/8x like the full model, tiny widths
TINY_8X = dict(base_channels=8, channel_multipliers=[1, 1, 2, 2], res_blocks=1,
               latent_channels=4, norm_groups=4)
# 4x/4x with small tiles, so tiling shows on small clips
TINY_4X = dict(base_channels=8, channel_multipliers=[1, 2, 2], res_blocks=1, latent_channels=4,
               temporal_compression=4, spatial_compression=4, norm_groups=4, tile_frames=16,
               decode_overlap_frames=8, spatial_tile_size=64, spatial_tile_overlap=32)


def randomised(model: TemporalAutoencoder, scale: float = 0.05) -> TemporalAutoencoder:
    """Move the temporal layers off their identity init so they mix frames."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def wave_video(frames: int, height: int, width: int, cycles: tuple[float, float, float],
               seed: int = 0) -> torch.Tensor:
    """(1, 3, T, H, W) plane waves with ``cycles`` periods along (T, H, W) over the clip."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(torch.arange(frames) / frames, torch.arange(height) / height,
                           torch.arange(width) / width, indexing="ij")
    phase = sum(c * grid for c, grid in zip(cycles, grids, strict=True))
    return torch.stack([0.8 * torch.sin(2 * math.pi * phase + 6 * torch.rand(1, generator=g))
                        for _ in range(3)])[None]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("frames", [1, 8, 13, 32])
def test_frame_count_convention_pads_and_crops(frames):
    model = TemporalAutoencoder(**TINY_8X)
    video = torch.rand(2, 3, frames, 17, 9) * 2 - 1
    shape = model.latent_shape(frames, 17, 9)
    assert shape == (4, math.ceil(frames / 8), 3, 2)
    with torch.no_grad():
        latent = model.encode(video)
        assert latent.shape == (2, *shape)
        assert model.decode(latent).shape == (2, 3, 8 * shape[1], 24, 16)
        assert model.decode(latent, frames=frames, height=17, width=9).shape == video.shape
        reconstruction, mean, logvar = model(video)
    assert reconstruction.shape == video.shape
    assert mean.shape == logvar.shape == (2, *shape)


def test_padding_replicates_the_last_frame():
    model = randomised(TemporalAutoencoder(**TINY_8X))
    video = torch.rand(1, 3, 5, 16, 16)
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(video), model.encode(padded), rtol=0, atol=0)


def test_bad_sizes_raise_clear_errors():
    model = TemporalAutoencoder(**TINY_8X)
    latent = torch.zeros(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match=r"decode\(frames=8\).*9..16 frames"):
        model.decode(latent, frames=8)
    with pytest.raises(ValueError, match="autoencoder.latent_channels=4"):
        model.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="autoencoder.in_channels=3"):
        model.encode(torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="must be positive"):
        model.latent_shape(0, 16, 16)


@pytest.mark.parametrize("fields,key", [
    (dict(spatial_compression=6), "autoencoder.spatial_compression=6"),
    (dict(channel_multipliers=[1, 2]), "autoencoder.channel_multipliers"),
    (dict(norm_groups=48), "autoencoder.norm_groups=48"),
    (dict(tile_frames=20), "autoencoder.tile_frames=20"),
    (dict(decode_overlap_frames=32), "autoencoder.decode_overlap_frames=32"),
    (dict(latent_scale=0.0), "autoencoder.latent_scale"),
])
def test_config_errors_name_the_key(fields, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        TAEConfig(**fields)


def test_fresh_model_is_an_inflated_image_autoencoder():
    model = TemporalAutoencoder(**TINY_8X)
    for module in model.modules():
        if isinstance(module, (TemporalConv, TemporalDownsample)):
            assert torch.count_nonzero(module.conv.weight) == 0
        if isinstance(module, TemporalAttention):
            assert torch.count_nonzero(module.attn.wo.weight) == 0
    image = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    latent = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        # a still video encodes to the image's latent in every latent frame
        still = model.encode(image.expand(-1, -1, 24, -1, -1))
        torch.testing.assert_close(still, model.encode(image).expand_as(still))
        # each latent frame decodes on its own, to 8 equal frames
        video = model.decode(latent)
        for k in range(3):
            alone = model.decode(latent[:, :, k:k + 1])
            torch.testing.assert_close(video[:, :, 8 * k:8 * k + 8],
                                       alone.expand(-1, -1, 8, -1, -1))
        # control: trained temporal layers mix latent frames
        randomised(model)
        video = model.decode(latent)
        assert not torch.allclose(video[:, :, :8], model.decode(latent[:, :, :1]), atol=1e-4)


def test_init_is_a_function_of_seed_and_name():
    built = TemporalAutoencoder(**TINY_8X, init_seed=3)
    with torch.device("meta"):
        meta = TemporalAutoencoder(**TINY_8X, init_seed=3)
    assert all(p.is_meta for p in meta.parameters())
    for name, param in built.named_parameters():
        assert torch.equal(param, initial_value(meta, name, param.shape, seed=3)), name
    conv = built.encoder.conv_in.spatial.weight
    assert conv.std().item() == pytest.approx(conv[0].numel() ** -0.5, rel=0.25)
    norm = built.encoder.norm_out.weight
    assert torch.equal(norm, torch.ones_like(norm))
    other = TemporalAutoencoder(**TINY_8X, init_seed=4)
    assert not torch.equal(conv, other.encoder.conv_in.spatial.weight)


def test_forward_samples_with_the_generator():
    model = TemporalAutoencoder(**TINY_8X)
    video = torch.rand(1, 3, 8, 16, 16)
    with torch.no_grad():
        a = model(video, torch.Generator().manual_seed(1))[0]
        b = model(video, torch.Generator().manual_seed(1))[0]
        c = model(video, torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(1, 4, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(video, noise=noise)[0], a)
    with pytest.raises(ValueError, match="noise of shape"):
        model(video, noise=noise[:, :2])


def test_latent_scale_scales_encode_and_undoes_in_decode():
    video = torch.rand(1, 3, 8, 16, 16)
    plain = TemporalAutoencoder(**TINY_8X)
    scaled = TemporalAutoencoder(**TINY_8X, latent_scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(scaled.encode(video), 0.5 * plain.encode(video))
        latent = torch.randn(1, 4, 1, 2, 2)
        torch.testing.assert_close(scaled.decode(0.5 * latent), plain.decode(latent))


# --- configs ---------------------------------------------------------------------------

def _yaml_config(name: str):
    node = OmegaConf.load(ROOT / "conf" / "autoencoder" / f"{name}.yaml")
    assert list(node.pop("defaults")) == ["tae_schema", "_self_"]
    return OmegaConf.merge(OmegaConf.structured(TAEConfig), node)


def test_structured_config_instantiates():
    model = instantiate(OmegaConf.structured(TAEConfig(**TINY_8X)))
    assert isinstance(model, TemporalAutoencoder) and model.latent_channels == 4


def test_yaml_configs_compose_and_instantiate():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="autoencoder", name="tae_schema", node=TAEConfig)
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        composed = compose(overrides=["+autoencoder=tae_tiny"]).autoencoder
    assert composed == _yaml_config("tae_tiny")
    tiny = instantiate(composed)
    assert tiny.latent_shape(8, 32, 32) == (8, 2, 8, 8)
    with torch.device("meta"):
        full = instantiate(_yaml_config("tae_movie_gen"))
    assert full.latent_shape(256, 768, 768) == (16, 32, 96, 96)
    assert full.cfg.tile_frames == 32 and full.cfg.decode_overlap_frames == 16


# --- losses ----------------------------------------------------------------------------

def test_kl_matches_the_closed_form():
    mean, logvar = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0, 1))
    torch.testing.assert_close(kl_loss(mean, logvar), expected.mean())


def test_opl_is_zero_for_inliers_and_catches_a_spot():
    z = torch.randn(2, 16, 2, 6, 6)
    assert outlier_penalty_loss(z) == 0
    z[1, :, 1, 3, 4] = 20.0
    positions = z[1].flatten(1)
    centre, spread = positions.mean(1), positions.std(1, correction=0).norm()
    by_hand = sum(max((positions[:, i] - centre).norm().item() - 3 * spread.item(), 0.0)
                  for i in range(positions.shape[1])) / (2 * positions.shape[1])
    assert by_hand > 0
    assert outlier_penalty_loss(z).item() == pytest.approx(by_hand, rel=1e-5)


def test_hinge_losses():
    assert discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)) == 1.0
    assert generator_adversarial_loss(torch.tensor([1.0, 3.0])) == -2.0


def test_discriminator_with_detached_params_gets_no_grad():
    disc = PatchDiscriminator(channels=8, layers=3)
    disc.init_weights(0)
    x = torch.randn(2, 3, 2, 16, 16, requires_grad=True)
    out = disc(x, detach_params=True)
    assert out.shape == (2, 1, 2, 2, 2)
    out.sum().backward()
    assert all(p.grad is None for p in disc.parameters())
    assert x.grad.abs().sum() > 0
    attached = disc(x)
    assert torch.equal(attached, out)
    attached.sum().backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_adaptive_weight_is_the_gradient_ratio_and_falls_back():
    x = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    weight = adaptive_gan_weight((a * x).sum(), (b * x).sum(), x, max_weight=1e4)
    assert weight.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    # no GAN gradient: the clamp, not a division blow-up
    assert adaptive_gan_weight((a * x).sum(), (0 * x).sum(), x, max_weight=7.0) == 7.0
    for bad in (float("inf"), float("nan")):
        assert adaptive_gan_weight((a * x).sum(), (x * bad).sum(), x, max_weight=7.0) == 0.0
        assert adaptive_gan_weight((x * bad).sum(), (b * x).sum(), x, max_weight=7.0) == 0.0


def _loss_inputs():
    video = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    reconstruction = (video + 0.1 * torch.randn_like(video)).requires_grad_()
    return video, reconstruction, torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)


def test_one_backward_trains_generator_and_discriminator_apart():
    disc = PatchDiscriminator(channels=8, layers=2)
    disc.init_weights(0)
    cfg = TAELossConfig(disc_start=5)
    video, reconstruction, mean, logvar = _loss_inputs()
    total, metrics = tae_loss(video, reconstruction, mean, logvar, cfg, step=5, discriminator=disc)
    total.backward()
    params = list(disc.parameters())
    expected_disc = torch.autograd.grad(
        discriminator_loss(disc(video), disc(reconstruction.detach())), params)
    for param, grad in zip(params, expected_disc, strict=True):
        torch.testing.assert_close(param.grad, grad)
    generator_loss = ((reconstruction - video).abs().mean() + metrics["adaptive_weight"]
                      * cfg.disc_weight * generator_adversarial_loss(disc(reconstruction)))
    expected_rec, = torch.autograd.grad(generator_loss, reconstruction)
    torch.testing.assert_close(reconstruction.grad, expected_rec)
    assert metrics["adaptive_weight"] > 0
    # before disc_start the discriminator is not consulted
    _, early = tae_loss(video, reconstruction, mean, logvar, cfg, step=4, discriminator=disc)
    assert "disc" not in early


class _SpikyDiscriminator(torch.nn.Module):
    """Finite logits whose gradient is infinite at the input's minimum (sqrt at 0)."""

    def forward(self, x, detach_params=False):
        return (x - x.detach().amin()).abs().sqrt()


def test_nonfinite_gan_gradient_drops_the_generator_term():
    video, reconstruction, mean, logvar = _loss_inputs()
    cfg = TAELossConfig(disc_start=0)
    total, metrics = tae_loss(video, reconstruction, mean, logvar, cfg, step=0,
                              discriminator=_SpikyDiscriminator())
    assert torch.isfinite(metrics["gen_adv"]) and metrics["adaptive_weight"] == 0
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(reconstruction.grad).all()
    without_gan = (metrics["l1"] + cfg.kl_weight * metrics["kl"] + cfg.opl_weight * metrics["opl"]
                   + metrics["disc"])
    torch.testing.assert_close(total.detach(), without_gan)


def test_opl_switch():
    video, reconstruction, _, _ = _loss_inputs()
    # 16 positions: a lone spot pulls the std with it, so it stands out only among > r² + 1
    mean, logvar = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 1, 4, 4)
    mean[0, :, 0, 0, 0] = 50.0
    on, metrics = tae_loss(video, reconstruction, mean, logvar, TAELossConfig(), step=0)
    off, _ = tae_loss(video, reconstruction, mean, logvar, TAELossConfig(opl=False), step=0)
    torch.testing.assert_close(on - off, 1e5 * metrics["opl"])
    assert metrics["opl"] > 0


# --- tiling ----------------------------------------------------------------------------

def test_one_tile_is_bitwise_untiled():
    model = randomised(TemporalAutoencoder(**TINY_4X))
    video = torch.rand(1, 3, 16, 64, 48) * 2 - 1
    with torch.no_grad():
        latent = model.encode(video, tiled=False)
        assert torch.equal(model.encode(video, tiled=True), latent)
        assert torch.equal(model.decode(latent[:, :, :4], tiled=True),
                           model.decode(latent[:, :, :4], tiled=False))


def test_blend_weights_sum_to_one_and_local_maps_tile_exactly():
    assert torch.allclose(ramp(8, 0, 4)[-4:] + ramp(8, 4, 0)[:4], torch.ones(4))
    tiles = ((4, 2), (8, 4), (8, 4))
    x = torch.randn(2, 3, 11, 19, 13)
    ones = tiled_apply(lambda t: torch.ones_like(t), x, tiles, 3, (11, 19, 13))
    torch.testing.assert_close(ones, torch.ones_like(x), rtol=0, atol=1e-6)
    upsample = lambda t: t.repeat_interleave(8, 2).repeat_interleave(2, 3)  # noqa: E731
    blended = tiled_apply(upsample, x, tiles, 3, (88, 38, 13))
    torch.testing.assert_close(blended, upsample(x), rtol=0, atol=1e-5)


def test_temporal_tiles_match_untiled_within_tolerance():
    video = wave_video(48, 32, 32, cycles=(0.25, 1.0, 0.5))  # 3 encoder tiles, 5 decoder tiles
    fresh = TemporalAutoencoder(**TINY_4X)
    mixing = randomised(TemporalAutoencoder(**TINY_4X))
    with torch.no_grad():
        for model, tolerance in ((fresh, 1e-5), (mixing, 0.08)):
            latent = model.encode(video, tiled=False)
            assert relative_error(model.encode(video, tiled=True), latent) < tolerance
            assert relative_error(model.decode(latent, tiled=True),
                                  model.decode(latent, tiled=False)) < tolerance


def test_spatial_tiles_match_untiled_within_tolerance():
    video = wave_video(4, 96, 96, cycles=(0.25, 6.0, 4.0))  # 2 x 2 tiles of 64 px
    model = TemporalAutoencoder(**TINY_4X)
    with torch.no_grad():
        latent = model.encode(video, tiled=False)
        assert relative_error(model.encode(video), latent) < 0.25
        assert relative_error(model.decode(latent), model.decode(latent, tiled=False)) < 0.25


def test_tiled_encode_only_runs_the_net_on_tiles():
    model = TemporalAutoencoder(**{**TINY_4X, "tile_frames": 32, "decode_overlap_frames": 16})
    seen = {"encoder": [], "decoder": []}
    for name in seen:
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: seen[name].append(args[0].shape[2]))
    with torch.no_grad():
        latent = model.encode(torch.rand(1, 3, 128, 8, 8))
        video = model.decode(latent)
    assert latent.shape[2] == 32 and video.shape[2] == 128
    assert seen["encoder"] == [32] * 4
    assert max(seen["decoder"]) == 8 and len(seen["decoder"]) == 7
