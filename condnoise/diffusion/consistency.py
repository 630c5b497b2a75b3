"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1).

A student ``f(x_t, w, c, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, w, c, t)`` learns to map
every point of the teacher's guided probability-flow ODE trajectory to the same x0. Per
training sample (diffusers' ``train_lcm_distill_sd_wds.py`` follows the same steps):

1. a timestep ``t_{n+k}`` from the skipping-step grid ``k-1, 2k-1, ..., T-1`` (``k = T // N``,
   :func:`solver_timesteps`) and ``t_n = max(t_{n+k} - k, 0)``;
2. ``x_{t_{n+k}} = q_sample(x0, t_{n+k}, noise)``;
3. the frozen teacher's classifier-free guided output at ``x_{t_{n+k}}`` with scale ``s``
   (one batched forward, :func:`~condnoise.diffusion.samplers.guided_eps`; LCM's
   ``w = s - 1``), turned into ``(x0, eps)`` by the schedule's one conversion
   (:meth:`~condnoise.diffusion.schedule.NoiseSchedule.to_x0_eps`);
4. one DDIM step (eta 0) to ``t_n``: ``x_{t_n} = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps``, i.e.
   ``q_sample(x0, t_n, eps)``;
5. the loss ``d(f_student(x_{t_{n+k}}, t_{n+k}), f_target(x_{t_n}, t_n))`` with the target
   network (an EMA of the student, never perturbed) under ``no_grad``; ``d`` is L2 or the
   pseudo-Huber ``sqrt(diff^2 + c^2) - c`` (Song & Dhariwal 2023).

Boundary scalings (:func:`boundary_scalings`) are diffusers' ``LCMScheduler`` discrete ones,
``c_skip = sigma_data^2 / ((10 t)^2 + sigma_data^2)``, ``c_out = 10 t / sqrt((10 t)^2 +
sigma_data^2)``, sigma_data = 0.5, so that the sampler (``LCMScheduler``) applies exactly
what the student was trained with; at t = 0 they give ``f = x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from condnoise.errors import UserError

SIGMA_DATA = 0.5  # LCMScheduler's sigma_data
TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling (the sampler uses this one)
LOSSES = ("l2", "huber")


def solver_timesteps(num_train_steps: int, solver_steps: int) -> torch.Tensor:
    """The skipping-step grid ``[k-1, 2k-1, ..., N k - 1]``, ``k = T // N``, int64 ``[N]``
    (LCMScheduler's ``lcm_origin_timesteps`` for ``original_inference_steps = N``)."""
    if not 1 <= solver_steps <= num_train_steps:
        raise UserError(f"lcm solver_steps must be in [1, {num_train_steps}] (the schedule's "
                        f"training steps), got {solver_steps}")  # fmt: skip
    k = num_train_steps // solver_steps
    return torch.arange(1, solver_steps + 1, dtype=torch.int64) * k - 1


def skipping_step(num_train_steps: int, solver_steps: int) -> int:
    """``k = T // N``: how far one solver step jumps."""
    return num_train_steps // solver_steps


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` float32 ``[B]`` of integer timesteps ``t`` (see the module docstring)."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def consistency_output(schedule: Any, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``f = c_skip(t) x_t + c_out(t) x0(out)`` for a model output ``out`` (eps or v)."""
    x0, _ = schedule.to_x0_eps(out.float(), x_t.float(), t)
    c_skip, c_out = (c.view(-1, *([1] * (x_t.dim() - 1))) for c in boundary_scalings(t))
    return c_skip * x_t.float() + c_out * x0


def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """Per-sample mean ``d(a, b)`` ``[B]``: squared error or pseudo-Huber ``sqrt(d^2 + c^2) - c``."""
    diff = (a.float() - b.float()).flatten(1)
    if loss == "l2":
        return diff.pow(2).mean(1)
    if loss == "huber":
        return (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c).mean(1)
    raise UserError(f"unknown consistency loss {loss!r}; choose one of {', '.join(LOSSES)}")


@dataclass
class LCDDraws:
    """One step's random draws (for the rows of a batch): grid indices ``[B]`` (of
    :func:`solver_timesteps`), initial noise ``[B, C, H, W]`` and CFG scales ``s`` ``[B]``."""

    index: torch.Tensor
    noise: torch.Tensor
    guidance: torch.Tensor

    def rows(self, rows: slice) -> LCDDraws:
        return LCDDraws(self.index[rows], self.noise[rows], self.guidance[rows])


def draw(batch: int, shape: tuple[int, ...], solver_steps: int, guidance_range: tuple[float, float],
         device: torch.device, generator: torch.Generator) -> LCDDraws:  # fmt: skip
    """The draws of a whole (global) batch from ``generator``: index, then noise, then scale."""
    index = torch.randint(0, solver_steps, (batch,), device=device, generator=generator)
    noise = torch.randn((batch, *shape), device=device, generator=generator)
    lo, hi = guidance_range
    s = lo + (hi - lo) * torch.rand((batch,), device=device, generator=generator)
    return LCDDraws(index, noise, s)


@dataclass
class LCDLoss:
    loss: torch.Tensor  # scalar, differentiable in the student
    per_sample: torch.Tensor  # [B], detached
    t_start: torch.Tensor  # [B] t_{n+k}


def lcd_loss(student: Any, teacher: Any, target: Any, schedule: Any, x0: torch.Tensor,
             cond: torch.Tensor, draws: LCDDraws, *, solver_steps: int, timestep_cond: torch.Tensor,
             loss: str = "l2", huber_c: float = 0.001, **model_kwargs: Any) -> LCDLoss:  # fmt: skip
    """The latent consistency distillation loss of one batch (steps 2-5 of the module docstring).

    ``student`` (training mode, possibly DDP-wrapped; ``model_kwargs`` such as
    ``sample_index`` / ``step`` reach its perturbation), ``teacher`` (frozen diffusion model)
    and ``target`` (EMA of the student, never perturbed) are conditional models ``(x_t, t,
    cond, **extra) -> eps or v``; ``timestep_cond`` is the student's guidance embedding of
    ``draws.guidance`` (``model.guidance_cond``). Models with 2C output channels
    (learn_sigma) contribute their first C.
    """
    from condnoise.diffusion.samplers import guided_eps

    c = x0.shape[1]
    grid = solver_timesteps(schedule.num_steps, solver_steps).to(x0.device)
    t_start = grid[draws.index]
    t_end = (t_start - skipping_step(schedule.num_steps, solver_steps)).clamp(min=0)
    x_start = schedule.q_sample(x0, t_start, draws.noise.to(x0.dtype))
    out = student(x_start, t_start, cond, timestep_cond=timestep_cond, **model_kwargs)[:, :c]
    pred = consistency_output(schedule, out, x_start, t_start)
    with torch.no_grad():
        guided = guided_eps(teacher, x_start, t_start, cond, guidance=draws.guidance)
        x0_teacher, eps_teacher = schedule.to_x0_eps(guided.float(), x_start.float(), t_start)
        x_end = schedule.q_sample(x0_teacher, t_end, eps_teacher)  # one DDIM step to t_n
        out_target = target(x_end.to(x0.dtype), t_end, cond, timestep_cond=timestep_cond)[:, :c]
        goal = consistency_output(schedule, out_target, x_end, t_end)
    per_sample = distance(pred, goal, loss, huber_c)
    return LCDLoss(per_sample.mean(), per_sample.detach(), t_start)
