"""Flow matching on the straight path (arXiv 2410.13720 §2).

Convention: t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
x_t = t * x1 + (1 - (1 - sigma_min) * t) * x0, target velocity v = x1 - (1 - sigma_min) * x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Draw on the generator's device (a CUDA generator cannot fill a CPU tensor)."""
    return None if generator is None else generator.device


@dataclass
class FlowMatching:
    sigma_min: float = 1e-5
    t_mean: float = 0.0  # logit-normal location of the training t
    t_std: float = 1.0   # logit-normal scale
    noise_offset: float = 0.0  # training noise only; see ``noise``

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """Training noise x0 of ``shape`` (B, C, ...): N(0, I), plus with ``noise_offset`` = o
        the offset noise of quality tuning (arXiv 2309.15807): x0 = eps + o * delta, delta
        one N(0, 1) per sample and channel, constant over the other dims.

        The path and target keep their form in this x0: x_t = t x1 + (1 - (1 - sigma_min) t)
        x0 and v = x1 - (1 - sigma_min) x0, so each sample's channel means start off by
        o * delta and the velocity must remove them. White noise alone shifts a channel
        mean by only ~1/sqrt(T H W), so without the offset the model barely learns to move
        a sample's overall brightness or colour. Sampling still starts from N(0, I).
        o = 0 draws exactly what plain training draws (eps only), so the run is unchanged.
        """
        device = _device(generator)
        x0 = torch.randn(shape, generator=generator, device=device)
        if self.noise_offset:
            delta = torch.randn((*shape[:2], *[1] * (len(shape) - 2)), generator=generator,
                                device=device)
            x0 = x0 + self.noise_offset * delta
        return x0

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times, logit-normal(t_mean, t_std): (batch,) in (0, 1)."""
        normal = torch.randn(batch, generator=generator, device=_device(generator))
        return torch.sigmoid(self.t_mean + self.t_std * normal)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _expand(t, x1)
        return t * x1 + (1 - (1 - self.sigma_min) * t) * x0

    def target(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return x1 - (1 - self.sigma_min) * x0

    def predicted_noise(self, x_t: torch.Tensor, velocity: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        """The noise x̂0 a velocity implies at x_t. With c = 1 - sigma_min,
        x_t = t·(v + c·x0) + (1 - c·t)·x0 = x0 + t·v exactly, so x̂0 = x_t - t·v̂."""
        return x_t - _expand(t, velocity) * velocity

    def predicted_data(self, x_t: torch.Tensor, velocity: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
        """The clean estimate x̂1 = v̂ + c·x̂0 = c·x_t + (1 - c·t)·v̂ (c = 1 - sigma_min);
        x_t + (1 - t)·v̂ as sigma_min -> 0."""
        c, t = 1 - self.sigma_min, _expand(t, velocity)
        return c * x_t + (1 - c * t) * velocity

    def loss(self, velocity: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Mean squared error to the target velocity, a scalar in fp32."""
        return torch.mean((velocity.float() - self.target(x0, x1).float()) ** 2)
