"""Discrete-time DDPM noise schedules (paper Sec. 4: linear betas, 1000 steps, eps-prediction).

``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t = prod_{s<=t} (1 - beta_s)``
(Ho et al. 2020, Eq. 4). Timesteps are 0-based: ``t in {0, ..., num_steps - 1}``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from condnoise.errors import UserError

#: schedule kind -> (diffusers ``beta_schedule`` name, default beta_start, default beta_end)
SCHEDULES: dict[str, tuple[str, float, float]] = {
    "linear": ("linear", 1e-4, 0.02),  # DDPM / DiT (ADM) linear betas
    "scaled-linear": ("scaled_linear", 0.00085, 0.012),  # LDM: linear in sqrt(beta)
    "cosine": ("squaredcos_cap_v2", 0.0, 0.999),  # Nichol & Dhariwal 2021; end = beta cap
}


def _betas(kind: str, num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "scaled-linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    # cosine: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008; betas capped at 0.999
    s = 0.008

    def abar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return np.minimum(1 - abar(u[1:]) / abar(u[:-1]), beta_end)


class NoiseSchedule:
    """Betas and cumulative alphas for a discrete diffusion process.

    ``kind``: ``linear`` (default, 1e-4..0.02 as in DDPM / DiT), ``scaled-linear`` (LDM's
    sqrt-linear 0.00085..0.012) or ``cosine``. Tensors are float32 on CPU; indexing
    helpers move them to the device of their input (cached per device).
    """

    def __init__(
        self,
        kind: str = "linear",
        num_steps: int = 1000,
        *,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> None:
        if kind not in SCHEDULES:
            raise UserError(f"unknown noise schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise UserError(f"noise schedule num_steps must be an integer >= 2, got {num_steps!r}")
        _, default_start, default_end = SCHEDULES[kind]
        self.kind = kind
        self.num_steps = num_steps
        self.beta_start = default_start if beta_start is None else float(beta_start)
        self.beta_end = default_end if beta_end is None else float(beta_end)
        if not 0 <= self.beta_start < self.beta_end < 1:
            raise UserError(
                f"noise schedule needs 0 <= beta_start < beta_end < 1, got "
                f"{self.beta_start} and {self.beta_end}"
            )
        betas = _betas(kind, num_steps, self.beta_start, self.beta_end)
        abar = np.cumprod(1.0 - betas)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.sqrt_alphas_cumprod = torch.from_numpy(np.sqrt(abar)).float()
        self.sqrt_one_minus_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 - abar)).float()
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_steps={self.num_steps})"

    def config(self) -> dict:
        """Plain-dict description (for run configs and ``NoiseSchedule(**config)``)."""
        return {
            "kind": self.kind,
            "num_steps": self.num_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def diffusers_config(self) -> dict:
        """Keyword arguments for diffusers schedulers (``DDPMScheduler(**cfg)`` etc.)."""
        return {
            "num_train_timesteps": self.num_steps,
            "beta_schedule": SCHEDULES[self.kind][0],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def _coefs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (
                self.sqrt_alphas_cumprod.to(device),
                self.sqrt_one_minus_alphas_cumprod.to(device),
            )
        return self._device_cache[device]

    def sample_timesteps(
        self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform training timesteps, int64 [batch]."""
        return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. Eq. 4), t int64 [B]."""
        a, s = self._coefs(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        t = t.long()
        return a[t].view(shape).to(x0.dtype) * x0 + s[t].view(shape).to(x0.dtype) * noise
