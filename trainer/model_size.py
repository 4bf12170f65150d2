"""``python -m trainer.model_size model=dit_30b [data.frames=256 ...]``: size of a model.

Builds the configured DiT on the meta device (no memory is allocated, so the 30B model
is instant) and prints its parameter count, counted from the module and from the closed
form, and the training FLOPs of one sample: at the configured data shape when the data
fits the model, and always at the model's own sequence, its full position tables in its
own latent channels (``parallel.plan.model_latent_shape``, the shape the planner sizes).
"""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig

from models.costs import dit_parameter_count, dit_train_flops
from models.dit import DiT, patch_grid
from parallel.plan import model_latent_shape
from trainer.build import build_autoencoder
from trainer.config import ConfigError, register_configs, to_train_config
from trainer.start_checks import check_latent_fits


def flops_line(cfg, what: str, latent: tuple[int, ...]) -> str:
    tokens = math.prod(patch_grid(cfg.model, latent))
    context = sum(e.max_length for e in cfg.text.encoders.values())
    flops = dit_train_flops(cfg.model, tokens, context)
    return (f"{what} = latent {tuple(latent)} = {tokens:,} tokens (+{context} text): "
            f"{flops / 1e12:.3f} TFLOP per training step (forward + backward)")


def describe(cfg) -> list[str]:
    with torch.device("meta"):
        dit = DiT(cfg.model)
    counted = sum(p.numel() for p in dit.parameters())
    m = cfg.model
    lines = [f"DiT {m.depth} layers / width {m.width} / FFN {m.ffn_dim} / {m.heads} heads: "
             f"{counted:,} parameters ({counted / 1e9:.2f}B; closed form "
             f"{dit_parameter_count(m):,})"]
    try:
        latent = check_latent_fits(cfg, build_autoencoder(cfg, torch.device("meta")))
        lines.append(flops_line(cfg, f"one {cfg.data.frames}x{cfg.data.height}x"
                                     f"{cfg.data.width} sample", latent))
    except ConfigError as error:
        lines.append(f"the configured data does not fit this model ({error}); sized at the "
                     f"model's own sequence:")
    lines.append(flops_line(cfg, "the model's own sequence (its full position tables)",
                            model_latent_shape(m)))
    return lines


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="model_size")
def main(cfg: DictConfig) -> None:
    try:
        print("\n".join(describe(to_train_config(cfg))))
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None


if __name__ == "__main__":
    main()
