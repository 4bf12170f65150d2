import pytest
import torch

from models.init import init_parameters
from models.text import ByteTextEncoder, ByteTokenizer, TextConditioner


def encoder(dim=32, max_length=16):
    enc = ByteTextEncoder(dim=dim, depth=2, heads=4, ffn_dim=64, max_length=max_length)
    init_parameters(enc, seed=0)
    return enc


def test_byte_tokenizer_is_byt5_style():
    ids, mask = ByteTokenizer(8)(["ab", "", "héllo world"])
    assert ids[0, :3].tolist() == [ord("a") + 3, ord("b") + 3, 1] and ids[0, 3:].eq(0).all()
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # empty caption: eos only
    assert mask[2].all() and ids[2, -1] == 1      # truncated, still eos-terminated
    assert ids.max() < ByteTokenizer.vocab_size


def test_conditioner_concatenates_projected_encoders():
    cond = TextConditioner({"a": encoder(32, 16), "b": encoder(48, 8)}, width=64)
    init_parameters(cond, seed=0)
    tokens, mask = cond(["a red square", "x"])
    assert tokens.shape == (2, 24, 64) and mask.shape == (2, 24)
    assert mask[0, :13].all() and not mask[0, 13:16].any() and mask[0, 16:].any()
    single, _ = TextConditioner({"a": cond.encoders["a"]}, 64).requires_grad_(False), None
    single.projections["a"].load_state_dict(cond.projections["a"].state_dict())
    torch.testing.assert_close(single(["a red square", "x"])[0], tokens[:, :16])


def test_padding_does_not_change_real_token_states():
    enc = encoder(max_length=16)
    short, _ = enc.encode(["hello"])
    enc_long = ByteTextEncoder(dim=32, depth=2, heads=4, ffn_dim=64, max_length=40)
    enc_long.load_state_dict({k: (v if k != "pos" else torch.cat([v, torch.zeros(24, 32)]))
                              for k, v in enc.state_dict().items()})
    long, mask = enc_long.encode(["hello"])
    torch.testing.assert_close(long[:, :6], short[:, :6], rtol=1e-5, atol=1e-6)
    assert mask.sum() == 6


def test_bad_settings_raise_named_errors():
    with pytest.raises(ValueError, match="max_length=1"):
        ByteTokenizer(1)
    with pytest.raises(ValueError, match="dim=30: is not divisible by heads=4"):
        ByteTextEncoder(dim=30, depth=1, heads=4, ffn_dim=8, max_length=8)
    with pytest.raises(ValueError, match="text.encoders is empty"):
        TextConditioner({}, 8)


def test_frozen_encoder_gets_no_gradient_but_its_projection_does():
    frozen = ByteTextEncoder(dim=32, depth=1, heads=4, ffn_dim=64, max_length=16,
                             trainable=False)
    cond = TextConditioner({"byte": frozen}, width=32)
    init_parameters(cond, seed=0)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    tokens, _ = cond(["a red square", "a blue circle"])
    tokens.square().sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(p.grad is not None for p in cond.projections.parameters())
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    # random features still tell captions apart
    assert (tokens[0] - tokens[1]).norm() > 0.5 * tokens[0].norm()


def test_project_of_encode_is_forward_and_padding_never_reaches_the_dit():
    """The split lets cached encoder outputs stand in for ``encode``; garbage in padded
    positions of several concatenated encoders leaves the DiT output unchanged."""
    from models.dit import DiT, DiTConfig

    cond = TextConditioner({"a": encoder(32, 16), "b": encoder(48, 24)}, width=32)
    dit = DiT(DiTConfig(width=32, depth=2, heads=4, ffn_dim=48, in_channels=4,
                        max_patches_t=2, max_patches_h=2, max_patches_w=2))
    with torch.no_grad():
        for param in [*cond.parameters(), *dit.parameters()]:  # adaLN-zero: no identity
            param.normal_(std=0.2)
    captions = ["a red square", "x", ""]
    encoded = cond.encode(captions)
    context, mask = cond(captions)
    torch.testing.assert_close(cond.project(encoded)[0], context)
    garbage = {name: (states.masked_fill(~pad_mask[..., None], 1e4), pad_mask)
               for name, (states, pad_mask) in encoded.items()}
    x, t = torch.randn(3, 4, 2, 4, 4), torch.full((3,), 0.6)
    with torch.no_grad():
        clean = dit(x, t, context, mask)
        dirty = dit(x, t, *cond.project(garbage))
        unmasked = dit(x, t, cond.project(garbage)[0], None)
    torch.testing.assert_close(dirty, clean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked, clean, rtol=1e-3, atol=1e-4)  # the test can fail
    with pytest.raises(ValueError, match=r"encoders \['a'\] but the model was built with"):
        cond.project({"a": encoded["a"]})


def _word_states(encoder, caption, word):
    start = caption.index(word)
    return encoder.encode([caption])[0][0, start: start + len(word)].flatten()


def test_rope_positions_make_a_word_mostly_independent_of_where_it_starts():
    """Frozen at random init, an absolute table makes "left" at two offsets as far apart
    as "left" and "down" at one; relative positions keep the word, not its place."""
    cos = torch.nn.functional.cosine_similarity
    similarity = {}
    for positions in ("absolute", "rope"):
        encoder = ByteTextEncoder(64, 2, 4, 128, 48, trainable=False, positions=positions)
        init_parameters(encoder, 0)
        left = _word_states(encoder, "a red square moving left slowly", "left")
        shifted = _word_states(encoder, "a magenta triangle moving left slowly", "left")
        down = _word_states(encoder, "a red square moving down slowly", "down")
        similarity[positions] = (cos(left, shifted, 0).item(), cos(left, down, 0).item())
    assert similarity["absolute"][0] < 0.75
    assert similarity["rope"][0] > 0.85 > similarity["rope"][1]
    assert "pos" not in dict(ByteTextEncoder(64, 1, 4, 128, 16, positions="rope")
                             .named_parameters())


def test_rope_positions_setting_is_checked():
    with pytest.raises(ValueError, match="positions='relative'"):
        ByteTextEncoder(64, 1, 4, 128, 16, positions="relative")
    with pytest.raises(ValueError, match="even head dimension"):
        ByteTextEncoder(12, 1, 4, 32, 16, positions="rope")
