"""Reverse-process samplers with classifier-free guidance (paper section 5).

DDPM (ancestral), DDIM (eta = 0) and DPM-Solver++ 2M multistep are diffusers' schedulers,
configured from our :class:`~condnoise.diffusion.schedule.NoiseSchedule` betas
(``trained_betas``) so that every timestep the sampler visits is one the model was
trained on. All use "trailing" timestep spacing: the first step starts at t = T-1 (the
pure-noise end) and the last one lands on the data (alpha_bar = 1).

Classifier-free guidance (Ho & Salimans 2022), one batched forward on ``[x, x]`` with
``[cond, null]`` (``model.null_like(cond)``: the null class or the empty caption)::

    out = out_u + s * (out_c - out_u)

on the model's output whatever its type (eps or v: the combination is linear, as in
diffusers' pipelines); the scheduler gets the schedule's ``prediction_type``.
s = 1 is the purely conditional model (the unconditional half is skipped), s = 0 the
purely unconditional one (the conditional half is skipped). The paper's sweeps use
s in {1.5, ..., 10} (section 5).

``lcm`` samples a latent consistency student (``condnoise distill lcm``) with diffusers'
``LCMScheduler`` (Luo et al. 2023, Algorithm 3): at each of 1-8 steps the student's
consistency output ``c_skip x + c_out x0`` is re-noised to the next timestep of the
distillation's skipping-step grid. Guidance goes through the student's guidance embedding
(``model.guidance_cond``): one forward per step, no unconditional half.

Sampling is deterministic given the initial noise; DDPM's ancestral noise and LCM's re-noising
are drawn from per-sample generators, so sample i sees the same noise whatever batch it is in.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from condnoise.errors import UserError

SAMPLERS = ("ddpm", "ddim", "dpm++", "lcm")
"""Sampler names accepted by :func:`sample` and the CLI."""

DETERMINISTIC_SAMPLERS = ("ddim", "dpm++")
"""Samplers whose output is a function of the initial noise alone (ODE solvers)."""

PRECISIONS = ("fp32", "bf16", "fp16")


def null_condition(model: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
    """``model.null_like(cond)``: the null rows CFG's unconditional branch uses."""
    null_like = getattr(model, "null_like", None)
    if null_like is None:
        raise UserError(
            f"{type(model).__name__} has no null condition (null_like): it was not trained with "
            "classifier-free guidance, so it cannot be sampled with guidance"
        )
    return null_like(cond)


def check_sampler(sampler: str, steps: int, num_train_steps: int) -> None:
    """Raise UserError for an unknown sampler or a step count outside [1, T]."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= int(steps) <= num_train_steps:
        raise UserError(
            f"--steps {steps} is outside [1, {num_train_steps}] (the schedule's training steps)"
        )


def make_scheduler(schedule: Any, sampler: str, *, clip_x0: bool = False, solver_steps: int = 50) -> Any:
    """A fresh diffusers scheduler for ``sampler`` on ``schedule``'s betas and prediction
    type (``schedule.prediction_type``: ``epsilon`` or ``v_prediction``).

    ``clip_x0`` clips the predicted x0 to [-1, 1] at every step (pixel space only; for
    DPM-Solver++ this is dynamic thresholding with ``sample_max_value=1``, which reduces to
    clipping). ``solver_steps``: the N of an LCM student's skipping-step grid (``lcm``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    from condnoise.diffusion.consistency import TIMESTEP_SCALING

    betas = torch.as_tensor(schedule.betas, dtype=torch.float64).cpu().numpy()
    common = dict(
        num_train_timesteps=len(betas),
        trained_betas=betas,
        prediction_type=getattr(schedule, "prediction_type", "epsilon"),
        timestep_spacing="trailing",
    )
    if sampler == "ddpm":
        return DDPMScheduler(
            **common, variance_type="fixed_small", clip_sample=clip_x0, clip_sample_range=1.0
        )
    if sampler == "ddim":
        return DDIMScheduler(
            **common, clip_sample=clip_x0, clip_sample_range=1.0, set_alpha_to_one=True
        )
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
            thresholding=clip_x0,
            sample_max_value=1.0,
        )
    if sampler == "lcm":
        return LCMScheduler(
            **common, original_inference_steps=solver_steps, timestep_scaling=TIMESTEP_SCALING,
            clip_sample=clip_x0, clip_sample_range=1.0, set_alpha_to_one=True,
        )  # fmt: skip
    raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def guided_eps(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    guidance: float | torch.Tensor,
    **extra: Any,
) -> torch.Tensor:
    """Classifier-free guided model output, ``out_u + s (out_c - out_u)`` (eps or v).

    One forward on the concatenated batch ``[x, x]`` with ``[cond, model.null_like(cond)]``
    (labels ``[B]`` or token ids ``[B, L]``); a float s = 1 runs only the conditional half,
    s = 0 only the unconditional half; a tensor ``[B]`` gives each row its own scale (LCM
    distillation's teacher). A model with a learned variance (2C output channels, DiT's
    ``learn_sigma``) contributes its first C channels (eps); the samplers use fixed
    variances. ``extra`` tensors (batch-first) go to the model, doubled with the batch.
    """
    channels = x.shape[1]
    per_row = isinstance(guidance, torch.Tensor)
    if not per_row and guidance == 1.0:
        return model(x, t, cond, **extra)[:, :channels]
    null = null_condition(model, cond)
    if not per_row and guidance == 0.0:
        return model(x, t, null, **extra)[:, :channels]
    twice = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), **twice)[:, :channels]
    eps_c, eps_u = out.chunk(2)
    if per_row:
        guidance = guidance.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))  # type: ignore[union-attr]
    return eps_u + guidance * (eps_c - eps_u)


def _lcm_solver_steps(model: torch.nn.Module, steps: int) -> int:
    """The skipping-step grid size N of an LCM student; UserError for another model or more
    sampler steps than N."""
    lcm = getattr(model, "lcm", None)
    if not lcm:
        raise UserError("sampler lcm needs an LCM student (a run made by `condnoise distill lcm`); "
                        "sample this model with ddpm, ddim or dpm++")  # fmt: skip
    n = int(lcm["solver_steps"])
    if int(steps) > n:
        raise UserError(f"--steps {steps}: an LCM student distilled on a {n}-step grid samples in at most "
                        f"{n} steps")  # fmt: skip
    return n


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    schedule: Any,
    cond: torch.Tensor,
    noise: torch.Tensor,
    *,
    guidance: float,
    sampler: str = "dpm++",
    steps: int = 50,
    generator: list[torch.Generator] | None = None,
    clip_x0: bool = False,
    precision: str = "fp32",
    progress: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (x_T) to x_0, with classifier-free guidance.

    Args:
        model: ``forward(x_t, t, cond) -> eps or v`` with ``null_like(cond)``; put it in
            eval mode (CEP and other training-time perturbations must be off when sampling,
            paper section 3).
        schedule: the training NoiseSchedule (uses ``.betas`` and ``.prediction_type``).
        cond: int64 requested conditions, class labels ``[B]`` or token ids ``[B, L]``.
        noise: ``[B,C,H,W]`` initial Gaussian noise, on the model's device.
        guidance: CFG scale s >= 0 (1 = conditional only).
        sampler: one of :data:`SAMPLERS`.
        steps: number of sampler steps (model evaluations, times 2 for CFG).
        generator: per-sample CPU generators for DDPM's ancestral noise and LCM's re-noising
            (one per row).
        clip_x0: clip the predicted x0 to [-1, 1] at each step (pixel-space models).
        precision: ``fp32`` or autocast ``bf16`` / ``fp16`` for the model forward.
        progress: show a tqdm bar over steps.
        model_kwargs: extra model inputs at every step, e.g. an adapter's ``control``
            ``[B, C, H, W]`` and ``control_scale`` (tensors go to both CFG branches, as in
            diffusers' ControlNet pipelines).

    Returns:
        x_0 ``[B,C,H,W]`` float32 in the model's space (pixels in [-1, 1], or latents).
    """
    num_train = len(schedule.betas)
    check_sampler(sampler, steps, num_train)
    if guidance < 0 or guidance != guidance:
        raise UserError(f"guidance scale must be >= 0, got {guidance}")
    if cond.shape[0] != noise.shape[0]:
        raise ValueError(f"{cond.shape[0]} conditions for {noise.shape[0]} noise rows")
    if sampler in ("ddpm", "lcm") and generator is not None and len(generator) != noise.shape[0]:
        raise ValueError(f"{len(generator)} generators for {noise.shape[0]} noise rows")
    device = noise.device
    lcm = sampler == "lcm"
    if lcm:
        solver_steps = _lcm_solver_steps(model, steps)
        w_cond = model.guidance_cond(torch.full((cond.shape[0],), float(guidance), device=device))
    elif guidance != 1.0:
        null_condition(model, cond[:0])  # a clear error before any work
    scheduler = make_scheduler(schedule, sampler, clip_x0=clip_x0,
                               solver_steps=solver_steps if lcm else 50)  # fmt: skip
    scheduler.set_timesteps(int(steps), device=device)
    x = noise.float() * scheduler.init_noise_sigma
    cond = cond.to(device=device, dtype=torch.long)
    # plain ints read once: ``int(t)`` on a device tensor would wait for the GPU every step
    timesteps = [int(t) for t in scheduler.timesteps.cpu()]
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"{sampler} s={guidance:g}", leave=False)
    step_kwargs: dict[str, Any] = {"generator": generator} if sampler in ("ddpm", "lcm") else {}
    if sampler == "ddim" and clip_x0:
        # diffusers' DDIM keeps the unclipped eps in the direction term unless told, so the
        # clipped x0 and the direction disagree and the error grows with the step count
        step_kwargs["use_clipped_model_output"] = True
    kwargs = dict(model_kwargs or {})
    for t in timesteps:
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        with _autocast(device, precision):
            if lcm:  # guidance through the guidance embedding: one forward
                eps = model(x, t_batch, cond, timestep_cond=w_cond, **kwargs)[:, : x.shape[1]]
            else:
                eps = guided_eps(model, x, t_batch, cond, guidance=guidance, **kwargs)
        x = scheduler.step(eps.float(), t, x, **step_kwargs).prev_sample
    return x
