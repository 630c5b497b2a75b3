"""Discrete-time DDPM noise schedules and the model's prediction target.

``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t = prod_{s<=t} (1 - beta_s)``
(Ho et al. 2020, Eq. 4). Timesteps are 0-based: ``t in {0, ..., num_steps - 1}``.

Prediction targets (the paper's models all predict eps, Sec. 4): ``eps`` or ``v =
sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022, "Progressive distillation",
Sec. 4). :meth:`NoiseSchedule.to_x0_eps` is the one place that turns a model output of
either type back into ``(x0, eps)``; samplers, distillation and adapters use it.
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

#: prediction target -> diffusers' ``prediction_type``
PREDICTIONS: dict[str, str] = {"eps": "epsilon", "v": "v_prediction"}


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
        prediction: str = "eps",
    ) -> None:
        if kind not in SCHEDULES:
            raise UserError(f"unknown noise schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise UserError(f"noise schedule num_steps must be an integer >= 2, got {num_steps!r}")
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction target {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        _, default_start, default_end = SCHEDULES[kind]
        self.kind = kind
        self.prediction = prediction
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
        return f"NoiseSchedule(kind={self.kind!r}, num_steps={self.num_steps}, prediction={self.prediction!r})"

    def config(self) -> dict:
        """Plain-dict description (for run configs and ``NoiseSchedule(**config)``)."""
        return {
            "kind": self.kind,
            "num_steps": self.num_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction": self.prediction,
        }

    @property
    def prediction_type(self) -> str:
        """diffusers' name of the prediction target (``epsilon`` / ``v_prediction``)."""
        return PREDICTIONS[self.prediction]

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
        a, s = self._at(t, x0)
        return a * x0 + s * noise

    def _at(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(abar_t)``, ``sqrt(1 - abar_t)`` broadcastable against ``like`` [B, ...]."""
        a, s = self._coefs(like.device)
        shape = (-1,) + (1,) * (like.dim() - 1)
        t = t.long()
        return a[t].view(shape).to(like.dtype), s[t].view(shape).to(like.dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)``, float32 [B] on ``t``'s device."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1.0 - abar)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               prediction: str | None = None) -> torch.Tensor:  # fmt: skip
        """What the model regresses: ``noise`` (eps) or ``v = sqrt(abar) eps - sqrt(1-abar) x0``."""
        if (prediction or self.prediction) == "eps":
            return noise
        a, s = self._at(t, x0)
        return a * noise - s * x0

    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  prediction: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Model output (``prediction``, default the schedule's) -> ``(x0, eps)`` at ``x_t``.

        eps: ``x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)``; v (Salimans & Ho 2022, Eq. 10
        ff.): ``x0 = sqrt(abar) x_t - sqrt(1-abar) v``, ``eps = sqrt(1-abar) x_t + sqrt(abar) v``.
        """
        pred = prediction or self.prediction
        if pred not in PREDICTIONS:
            raise UserError(f"unknown prediction target {pred!r}; choose one of {', '.join(PREDICTIONS)}")
        a, s = self._at(t, x_t)
        if pred == "eps":
            return (x_t - s * out) / a, out
        return a * x_t - s * out, s * x_t + a * out
