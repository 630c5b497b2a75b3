"""``condnoise distill lcm``: latent consistency distillation of a trained run into a few-step student."""

from __future__ import annotations

import argparse
from typing import Any

from condnoise.app.common import (
    TRAIN_FLAGS,
    IntermixedParser,
    add_device_option,
    add_group_parser,
    add_parser,
    add_progress_option,
    flag_overrides,
    float_range,
    int_range,
    nonneg_int,
    positive_int,
    seed_int,
)

EPILOG = """\
examples:
  condnoise distill lcm runs/T --run-dir runs/T-lcm                     # clean student
  condnoise distill lcm runs/T --run-dir runs/T-lcm-cepu --perturb cep-u  # CEP-U on the student
  condnoise distill lcm runs/T --run-dir runs/T-lcm --resume            # after a crash / kill -9
  condnoise sample runs/T-lcm --sampler lcm --steps 1,2,4,8 --out runs/T-lcm/gen

The student copies the teacher's architecture and data (key=value overrides of the student's
config, e.g. train.lr=5e-5 data.max_samples=10000, follow the options); its run folder is
a training run: `condnoise sample` and `condnoise evaluate` work on it (EMA weights = the
target network).
"""


def register(subparsers: Any) -> None:
    _, sub = add_group_parser(subparsers, "distill", "METHOD",
                              help="distil a trained run into a few-step student (LCM)",
                              description="Distillation of trained runs: `lcm` (latent consistency "
                                          "distillation, Luo et al. 2023).")  # fmt: skip
    p = add_parser(
        sub, "lcm",
        help="latent consistency distillation (skipping-step DDIM on the guided teacher)",
        description=(
            "Latent consistency distillation (Luo et al. 2023): the student (a copy of the "
            "teacher with a guidance embedding) learns to map the teacher's classifier-free "
            "guided ODE trajectory, one skipping-step DDIM solver step at a time, onto its "
            "origin; CFG scale s is drawn from --guidance-range for every sample, the target "
            "network is an EMA of the student (train.ema_decay, 0.95) and never perturbed. "
            "Resumable (--resume, bitwise on CPU), torchrun-distributed like `condnoise train`."
        ),
        epilog=EPILOG,
    )  # fmt: skip
    p.__class__ = IntermixedParser
    p.add_argument("teacher", metavar="TEACHER_RUN", help="the teacher's training run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the student's config, e.g. train.lr=5e-5")
    p.add_argument("--run-dir", required=True, help="the student's run directory")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="distillation steps (overrides train.steps; None: 1000)")
    p.add_argument("--perturb", choices=("none", "cep-u", "cep-g"), default="none",
                   help="CEP on the student's condition during distillation")
    p.add_argument("--gamma", type=float_range(0), default=1.0, help="CEP strength gamma (cep-u / cep-g)")
    p.add_argument("--guidance-range", default="1,3", metavar="MIN,MAX",
                   help="CFG scales s drawn uniformly per sample (LCM's w = s - 1)")
    p.add_argument("--solver-steps", type=int_range(1, 1000), default=50,
                   help="N of the skipping-step DDIM grid (skipping step k = T // N)")
    p.add_argument("--w-embed-dim", type=int_range(4, 4096), default=256,
                   help="width of the student's guidance embedding (time_cond_proj_dim)")
    p.add_argument("--loss", choices=("l2", "huber"), default="l2", help="consistency distance")
    p.add_argument("--huber-c", type=float_range(0, lo_open=True), default=0.001,
                   help="c of the pseudo-Huber loss")
    p.add_argument("--teacher-step", type=nonneg_int, default=None,
                   help="teacher checkpoint (None: its latest; on --resume: the one the run started with)")
    p.add_argument("--teacher-weights", choices=("ema", "model"), default="ema",
                   help="the teacher's EMA or raw weights")
    p.add_argument("--ckpt-every", type=positive_int, default=None,
                   help="checkpoint every K steps (overrides train.ckpt_every)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the student in --run-dir from its latest checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start in a non-empty --run-dir that holds no condnoise run")
    add_device_option(p, "torch device; None: cuda:<LOCAL_RANK> when available, else cpu")
    add_progress_option(p)
    p.set_defaults(func=run_lcm)


def guidance_range(text: str) -> tuple[float, float]:
    """``"1,3"`` -> ``(1.0, 3.0)``; UserError unless two finite numbers 0 <= min <= max."""
    from condnoise.errors import UserError

    parts = [v.strip() for v in str(text).split(",")]
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise UserError(f"--guidance-range {text!r}: expected MIN,MAX (two numbers, e.g. 1,3)") from None
    if not 0 <= lo <= hi < float("inf"):
        raise UserError(f"--guidance-range {text!r}: need 0 <= MIN <= MAX")
    return lo, hi


def _teacher_step(args: argparse.Namespace) -> int | None:
    """--teacher-step, else on --resume the step the run started from (config.yaml)."""
    from condnoise.app.common import resumed_parent_step

    return resumed_parent_step(args.teacher_step, args.resume, args.run_dir, "distill", "teacher_step")


def run_lcm(args: argparse.Namespace) -> int:
    from condnoise.app.common import check_key_values, show_progress, status_printer

    check_key_values(args.overrides)
    lo, hi = guidance_range(args.guidance_range)
    from condnoise.training.distill import distill, student_config

    pert: dict[str, Any] = {"name": args.perturb}
    if args.perturb != "none":
        pert["gamma"] = args.gamma
    overrides = list(args.overrides)
    overrides += flag_overrides(args, TRAIN_FLAGS)
    cfg = student_config(
        args.teacher, perturbation=pert,
        lcm={"w_embed_dim": args.w_embed_dim, "solver_steps": args.solver_steps},
        distill={"guidance_min": lo, "guidance_max": hi, "loss": args.loss, "huber_c": args.huber_c,
                 "teacher_step": _teacher_step(args), "teacher_weights": args.teacher_weights},
        overrides=overrides, run_dir=args.run_dir,
    )  # fmt: skip
    cfg.run.progress = cfg.run.progress and show_progress(args)
    result = distill(cfg, run_dir=args.run_dir, resume=args.resume, device=args.device,
                     force=args.force, status=status_printer("distill"))  # fmt: skip
    from condnoise.training.runtime import cleanup_distributed

    cleanup_distributed()
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"distilled to step {result.step}; student run: {result.run_dir}")
    return 0
