"""Flow matching on the straight path (SPEC §2).

Convention: t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
x_t = t * x1 + (1 - (1 - sigma_min) * t) * x0, target velocity v = x1 - (1 - sigma_min) * x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class FlowMatching:
    sigma_min: float = 1e-5
    t_mean: float = 0.0  # logit-normal location of the training t
    t_std: float = 1.0   # logit-normal scale

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times, logit-normal(t_mean, t_std): (batch,) in (0, 1)."""
        normal = torch.randn(batch, generator=generator)
        return torch.sigmoid(self.t_mean + self.t_std * normal)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _expand(t, x1)
        return t * x1 + (1 - (1 - self.sigma_min) * t) * x0

    def target(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return x1 - (1 - self.sigma_min) * x0

    def loss(self, velocity: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Mean squared error to the target velocity, a scalar in fp32."""
        return torch.mean((velocity.float() - self.target(x0, x1).float()) ** 2)
