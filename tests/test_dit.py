import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.costs import dit_forward_flops, dit_parameter_count
from models.dit import DiT, DiTConfig
from tests.conftest import compose_train

TINY = DiTConfig(width=64, depth=3, heads=4, ffn_dim=128, in_channels=4,
                 max_patches_t=8, max_patches_h=8, max_patches_w=8)


def built(cfg: DiTConfig = TINY, randomise: bool = True) -> DiT:
    model = DiT(cfg)
    model.init_weights()
    if randomise:  # leave adaLN-zero init so every path carries signal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(b: int, t: int, h: int, w: int, cfg: DiTConfig = TINY, context_len: int = 5):
    x = torch.randn(b, cfg.in_channels, t, h, w)
    return x, torch.rand(b), torch.randn(b, context_len, cfg.width), torch.ones(
        b, context_len, dtype=torch.bool)


@pytest.mark.parametrize("b,t,h,w", [(1, 1, 2, 2), (2, 3, 4, 6), (3, 8, 16, 16), (2, 5, 8, 12)])
def test_output_shape_matches_input(b, t, h, w):
    x, tt, ctx, mask = inputs(b, t, h, w)
    assert built()(x, tt, ctx, mask).shape == x.shape


def test_fresh_block_is_identity_and_fresh_model_outputs_zero():
    model = built(randomise=False)
    x, t, ctx, mask = inputs(2, 2, 4, 4)
    h = torch.randn(2, 2 * 2 * 2, TINY.width)
    modulation = model.time_modulation(torch.nn.functional.silu(model.time_embed(t)))
    for block in model.blocks:
        assert torch.equal(block(h, modulation.unflatten(1, (6, -1)), ctx, mask), h)
    assert torch.count_nonzero(model(x, t, ctx, mask)) == 0


def test_position_tables_are_added_before_every_block():
    model = built()
    x, t, ctx, mask = inputs(1, 2, 4, 6)
    seen_inputs, seen_outputs = [], []

    def record(module, args, output):
        seen_inputs.append(args[0])
        seen_outputs.append(output)

    for block in model.blocks:
        block.register_forward_hook(record)
    model(x, t, ctx, mask)
    pos = model.pos_embed((2, 2, 3))
    first = model.patch_embed(model.patchify(x)) + pos
    torch.testing.assert_close(seen_inputs[0], first, rtol=0, atol=0)
    for i in range(1, TINY.depth):
        torch.testing.assert_close(seen_inputs[i], seen_outputs[i - 1] + pos, rtol=0, atol=0)


def test_position_embedding_is_factorised_t_major():
    model = built()
    pos = model.pos_embed((2, 3, 4)).view(2, 3, 4, -1)
    tables = model.pos_embed
    torch.testing.assert_close(pos[1, 2, 3], tables.t[1] + tables.h[2] + tables.w[3])


def test_text_changes_output_and_padding_mask_is_honoured():
    model = built()
    x, t, ctx, mask = inputs(1, 2, 4, 4)
    out = model(x, t, ctx, mask)
    assert not torch.allclose(out, model(x, t, torch.randn_like(ctx), mask))
    padded_ctx = torch.cat([ctx, 100 * torch.randn(1, 3, TINY.width)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, padded_ctx, padded_mask), out)


def test_no_biases_anywhere():
    for module in built().modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None


def test_bad_latent_shapes_name_the_numbers():
    model = built()
    with pytest.raises(ValueError, match="model.patch_h=2 does not divide the latent h-size 5"):
        model(*inputs(1, 2, 5, 4))
    with pytest.raises(ValueError, match="exceeds model.max_patches_w=8"):
        model(*inputs(1, 2, 4, 18))
    with pytest.raises(ValueError, match="model.in_channels=4"):
        model(torch.randn(1, 3, 1, 2, 2), *inputs(1, 1, 2, 2)[1:])


def test_config_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="model.width=100 is not divisible by model.heads=3"):
        DiTConfig(width=100, heads=3)


@pytest.mark.parametrize("name,expected_billions", [
    ("dit_tiny", None), ("dit_1b", 1.0), ("dit_5b", 5.0), ("dit_30b", 30.0)])
def test_parameter_counts_match_formula_on_meta(name, expected_billions):
    cfg = compose_train([f"model={name}"]).model
    with torch.device("meta"):
        model = DiT(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert count == dit_parameter_count(cfg)
    if expected_billions:  # Movie Gen's names are rounded: within 25 %
        assert abs(count / 1e9 - expected_billions) / expected_billions < 0.25, count


def test_dit_30b_has_about_30b_parameters():
    cfg = compose_train(["model=dit_30b"]).model
    assert (cfg.depth, cfg.width, cfg.ffn_dim, cfg.heads) == (48, 6144, 16384, 48)
    assert 28e9 < dit_parameter_count(cfg) < 31e9


def test_forward_flops_formula_matches_flop_counter():
    model = built()
    x, t, ctx, mask = inputs(2, 3, 4, 6, context_len=7)
    # the math backend runs attention as counted matmuls (the fused CPU kernel is uncounted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, ctx, mask)
    assert counter.get_total_flops() == dit_forward_flops(TINY, 3 * 2 * 3, 7, batch=2)


def test_zero_init_parts_receive_gradient_at_init():
    model = built(randomise=False)
    x, t, ctx, mask = inputs(2, 2, 4, 4)
    (model(x, t, ctx, mask) - torch.randn_like(x)).square().mean().backward()
    assert model.final.proj.weight.grad.abs().sum() > 0
    assert model.final.modulation.grad is not None
