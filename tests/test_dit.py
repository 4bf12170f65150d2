import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.costs import dit_forward_flops, dit_parameter_count
from models.dit import DiT, DiTConfig
from models.rope import RotaryEmbedding3D, apply_rotary, axis_dims
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


def test_text_modulation_reaches_every_token_through_adaln():
    """With cross-attention silenced, the caption still changes the output through the
    pooled-text path (and only with model.text_modulation=true); a fully masked caption
    pools to zeros."""
    cfg = dataclasses.replace(TINY, text_modulation=True)
    for config, depends in ((cfg, True), (TINY, False)):
        model = built(config)
        with torch.no_grad():
            for block in model.blocks:
                block.cross_attn.wo.weight.zero_()
        x, t, ctx, mask = inputs(1, 2, 4, 4, config)
        changed = not torch.allclose(model(x, t, ctx, mask), model(x, t, ctx + 1, mask))
        assert changed == depends
    model = built(cfg)
    none = torch.zeros_like(mask)
    pooled = model.text_embed(ctx, none)
    torch.testing.assert_close(pooled, model.text_embed(torch.zeros_like(ctx), none))


@pytest.mark.parametrize("text_modulation", [False, True])
def test_parameter_count_formula_covers_text_modulation(text_modulation):
    cfg = dataclasses.replace(TINY, text_modulation=text_modulation)
    assert sum(p.numel() for p in DiT(cfg).parameters()) == dit_parameter_count(cfg)


def test_data_prediction_returns_the_velocity_of_the_predicted_clip():
    """prediction=data: the network's output is the clean clip x1, and forward returns the
    velocity toward it, (x1 - x_t) / max(1 - t, gap), for every caller (loss, samplers)."""
    cfg = dataclasses.replace(TINY, prediction="data", data_prediction_min_gap=0.1)
    model = built(cfg)
    x, _, ctx, mask = inputs(3, 2, 4, 4, cfg)
    t = torch.tensor([0.0, 0.5, 1.0])
    as_velocity = DiT(dataclasses.replace(cfg, prediction="velocity"))
    as_velocity.load_state_dict(model.state_dict())
    clip = as_velocity(x, t, ctx, mask)
    expected = (clip - x) / torch.tensor([1.0, 0.5, 0.1]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(model(x, t, ctx, mask), expected)
    with pytest.raises(ValueError, match="model.prediction='noise' is not one of"):
        DiTConfig(prediction="noise")


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


@pytest.mark.parametrize("text_modulation", [False, True])
def test_forward_flops_formula_matches_flop_counter(text_modulation):
    cfg = dataclasses.replace(TINY, text_modulation=text_modulation)
    model = built(cfg)
    x, t, ctx, mask = inputs(2, 3, 4, 6, cfg, context_len=7)
    # the math backend runs attention as counted matmuls (the fused CPU kernel is uncounted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, ctx, mask)
    assert counter.get_total_flops() == dit_forward_flops(cfg, 3 * 2 * 3, 7, batch=2)


def test_zero_init_parts_receive_gradient_at_init():
    model = built(randomise=False)
    x, t, ctx, mask = inputs(2, 2, 4, 4)
    (model(x, t, ctx, mask) - torch.randn_like(x)).square().mean().backward()
    assert model.final.proj.weight.grad.abs().sum() > 0
    assert model.final.modulation.grad is not None


def test_rope_scores_depend_on_offsets_only():
    """Rotated q.k of two tokens is a function of their (dt, dh, dw) offset: the same
    vectors placed at two pairs of cells with one offset score alike, another offset
    scores differently."""
    rope = RotaryEmbedding3D(head_dim=12)
    grid = (3, 4, 5)
    cos, sin = rope(grid)
    assert cos.shape == sin.shape == (60, 6)
    q, k = torch.randn(12), torch.randn(12)

    def score(a, b):  # a, b: (t, h, w) cells
        index = [(t * grid[1] + h) * grid[2] + w for t, h, w in (a, b)]
        rotated = apply_rotary(torch.stack([q, k])[None, None], cos[index], sin[index])[0, 0]
        return rotated[0] @ rotated[1]

    assert torch.allclose(score((0, 0, 0), (1, 2, 3)), score((1, 1, 1), (2, 3, 4)), atol=1e-5)
    assert torch.allclose(score((2, 3, 4), (2, 3, 4)), q @ k, atol=1e-5)
    assert not torch.allclose(score((0, 0, 0), (0, 0, 1)), score((0, 0, 0), (0, 1, 0)))
    assert axis_dims(12) == (4, 4, 4) and axis_dims(32) == (12, 10, 10)


def test_rope_is_a_switch():
    """rope=false is the plain model; rope=true changes only self-attention's scores."""
    plain = built()
    with_rope = DiT(dataclasses.replace(TINY, rope=True))
    with_rope.load_state_dict(plain.state_dict())
    x, t, ctx, mask = inputs(2, 2, 4, 4)
    assert not torch.allclose(plain(x, t, ctx, mask), with_rope(x, t, ctx, mask))
    assert plain.rope is None and not list(with_rope.rope.parameters())


def test_sincos_position_tables_know_neighbours():
    """The structured start: each axis owns a third of the channels, and a patch's code is
    more similar to its neighbour's than to a far patch's, along every axis."""
    model = DiT(dataclasses.replace(TINY, position_init="sincos"))
    model.init_weights()
    third = TINY.width // 6 * 2
    for axis, table in enumerate((model.pos_embed.t, model.pos_embed.h, model.pos_embed.w)):
        owned = torch.zeros(TINY.width, dtype=torch.bool)
        owned[axis * third: (axis + 1) * third] = True
        assert torch.count_nonzero(table[:, ~owned]) == 0
        unit = torch.nn.functional.normalize(table[:, owned], dim=1)
        similarity = unit @ unit.T
        assert similarity[0, 1] > similarity[0, 4] and similarity[3, 4] > similarity[3, 7]
    with pytest.raises(ValueError, match="position_init"):
        DiTConfig(position_init="learned")
