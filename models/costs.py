"""Closed-form parameter and FLOP counts of the DiT (checked against the module in tests).

FLOPs count matrix multiplies only (2 per multiply-add), the convention of MFU figures
and of ``torch.utils.flop_counter``; norms, activations and modulation are O(L*D) and
left out. A training step is forward + backward = 3x the forward.
"""

from __future__ import annotations

from models.dit import DiTConfig


def dit_parameter_count(cfg: DiTConfig) -> int:
    d, f = cfg.width, cfg.ffn_dim
    patch_values = cfg.patch_volume * cfg.in_channels
    block = 8 * d * d + 3 * d * f + 6 * d + d  # self+cross attn, SwiGLU, adaLN table, norm
    return (patch_values * d                                   # patch embedding
            + (cfg.max_patches_t + cfg.max_patches_h + cfg.max_patches_w) * d
            + cfg.time_freq_dim * d + d * d                    # time MLP
            + 6 * d * d                                        # shared adaLN projection
            + (2 * d * d if cfg.text_modulation else 0)        # pooled-text MLP
            + cfg.depth * block
            + 2 * d + d * patch_values)                        # final layer


def dit_forward_flops(cfg: DiTConfig, video_tokens: int, context_tokens: int,
                      batch: int = 1) -> int:
    """Matmul FLOPs of one forward pass over ``batch`` samples."""
    d, f, n, m = cfg.width, cfg.ffn_dim, video_tokens, context_tokens
    patch_values = cfg.patch_volume * cfg.in_channels
    block = (8 * n * d * d        # self-attention q, k, v, o
             + 4 * n * n * d      # scores and weighted sum
             + 4 * n * d * d      # cross-attention q, o
             + 4 * m * d * d      # cross-attention k, v over the text
             + 4 * n * m * d      # cross-attention scores and weighted sum
             + 6 * n * d * f)     # SwiGLU
    per_sample = (2 * n * patch_values * d
                  + 2 * (cfg.time_freq_dim * d + d * d + 6 * d * d)
                  + (4 * d * d if cfg.text_modulation else 0)
                  + cfg.depth * block
                  + 2 * n * d * patch_values)
    return batch * per_sample


def dit_train_flops(cfg: DiTConfig, video_tokens: int, context_tokens: int,
                    batch: int = 1) -> int:
    return 3 * dit_forward_flops(cfg, video_tokens, context_tokens, batch)
