"""``condnoise finetune controlnet|t2i-adapter``: spatial-control adapters on a frozen base run."""

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
    nonneg_int,
    positive_int,
    seed_int,
)

EPILOG = """\
examples:
  condnoise finetune controlnet runs/B --control canny --run-dir runs/B-cn          # clean fine-tuning
  condnoise finetune controlnet runs/B --control canny --run-dir runs/B-cn-cepu --perturb cep-u
  condnoise finetune t2i-adapter runs/B --control mask --run-dir runs/B-t2i --epochs 10
  condnoise finetune controlnet runs/B --control canny --run-dir runs/B-cn --resume  # after a crash
  condnoise sample runs/B-cn --controls-from test --num 1000 --out runs/B-cn/gen
  condnoise evaluate runs/B-cn/gen --metrics fid,condition-accuracy,edge-f1

The base run is frozen (its architecture, data and diffusion process are kept; key=value
overrides of the adapter run's config, e.g. train.lr=5e-5 data.max_samples=10000, follow
the options); the adapter run is a training run: `condnoise sample` (with --controls-from)
and `condnoise evaluate` work on it.
"""


def register(subparsers: Any) -> None:
    _, sub = add_group_parser(subparsers, "finetune", "ADAPTER",
                              help="fine-tune a ControlNet or T2I-Adapter on a frozen U-Net base run",
                              description="Spatial-control adapters (diffusers) on a frozen U-Net "
                                          "base run: `controlnet` (Zhang et al. 2023) or "
                                          "`t2i-adapter` (Mou et al. 2023).")  # fmt: skip
    for name, what in (("controlnet", "ControlNet: a trainable copy of the base's encoder with zero "
                                      "convolutions (diffusers ControlNetModel.from_unet)"),
                       ("t2i-adapter", "T2I-Adapter: a small convolutional adapter whose features are "
                                       "added inside the base's encoder (diffusers T2IAdapter)")):  # fmt: skip
        p = add_parser(
            sub, name, help=what.split(":")[0] + " fine-tuning",
            description=(
                f"{what}. Trains the adapter on the base's training data with the control of "
                "each image (--control: OpenCV Canny edges, or segmentation masks: exact "
                "per-pixel classes for scenes, the foreground silhouette elsewhere) under the "
                "ordinary diffusion loss; the base stays frozen. Resumable (--resume, bitwise on "
                "CPU), torchrun-distributed like `condnoise train`; sample grids show control | "
                "samples. U-Net bases only (family unet or conv-unet): a DiT base is refused."
            ),
            epilog=EPILOG,
        )  # fmt: skip
        p.__class__ = IntermixedParser
        _add_options(p, name)


def _add_options(p: argparse.ArgumentParser, adapter: str) -> None:
    p.add_argument("base", metavar="BASE_RUN", help="the base's training run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the adapter run's config, e.g. train.lr=5e-5")
    p.add_argument("--run-dir", required=True, help="the adapter's run directory")
    p.add_argument("--control", choices=("canny", "mask"), default="canny",
                   help="the spatial control: Canny edges or segmentation masks")
    p.add_argument("--canny-low", type=float_range(0), default=100.0, help="lower Canny threshold")
    p.add_argument("--canny-high", type=float_range(0), default=200.0, help="upper Canny threshold")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="fine-tuning steps (overrides train.steps; None: 1000, or --epochs)")
    p.add_argument("--epochs", type=float_range(0, lo_open=True), default=None,
                   help="fine-tuning epochs over the base's training data (the paper: 10); "
                        "sets train.steps, --max-steps wins")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=None,
                   help="learning rate (overrides train.lr; None: 1e-4)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch (overrides train.batch_size; None: the base's)")
    p.add_argument("--perturb", choices=("none", "cep-u", "cep-g"), default="none",
                   help="CEP on the condition embedding during fine-tuning")
    p.add_argument("--gamma", type=float_range(0), default=1.0, help="CEP strength gamma (cep-u / cep-g)")
    if adapter == "t2i-adapter":
        p.add_argument("--t2i-type", choices=("full", "light"), default="full",
                       help="diffusers' full_adapter or light_adapter")
        p.add_argument("--res-blocks", type=positive_int, default=2,
                       help="T2I-Adapter residual blocks per level")
    p.add_argument("--base-step", type=nonneg_int, default=None,
                   help="base checkpoint (None: its latest; on --resume: the one the run started with)")
    p.add_argument("--base-weights", choices=("ema", "model"), default="ema",
                   help="the base's EMA or raw weights")
    p.add_argument("--ckpt-every", type=positive_int, default=None,
                   help="checkpoint every K steps (overrides train.ckpt_every)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the adapter in --run-dir from its latest checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start in a non-empty --run-dir that holds no condnoise run")
    add_device_option(p, "torch device; None: cuda:<LOCAL_RANK> when available, else cpu")
    add_progress_option(p)
    p.set_defaults(func=run_finetune, adapter=adapter)


def _base_step(args: argparse.Namespace) -> int | None:
    """--base-step, else on --resume the step the run started from (config.yaml)."""
    from condnoise.app.common import resumed_parent_step

    return resumed_parent_step(args.base_step, args.resume, args.run_dir, "finetune", "base_step")


def run_finetune(args: argparse.Namespace) -> int:
    import os

    from condnoise.app.common import check_key_values, show_progress, status_printer

    check_key_values(args.overrides)
    from condnoise.training.finetune import finetune, finetune_config

    pert: dict[str, Any] = {"name": args.perturb}
    if args.perturb != "none":
        pert["gamma"] = args.gamma
    adapter: dict[str, Any] = {"kind": args.adapter}
    if args.adapter == "t2i-adapter":
        adapter |= {"t2i_type": args.t2i_type, "num_res_blocks": args.res_blocks}
    flags = (*TRAIN_FLAGS, ("lr", "train.lr"), ("batch_size", "train.batch_size"))
    cfg = finetune_config(
        args.base, adapter=adapter, control=args.control, perturbation=pert,
        finetune={"canny_low": args.canny_low, "canny_high": args.canny_high,
                  "base_step": _base_step(args), "base_weights": args.base_weights},
        epochs=args.epochs, overrides=list(args.overrides) + flag_overrides(args, flags),
        run_dir=args.run_dir,
    )  # fmt: skip
    cfg.run.progress = cfg.run.progress and show_progress(args)
    result = finetune(cfg, run_dir=args.run_dir, resume=args.resume, device=args.device,
                      force=args.force, status=status_printer("finetune"))  # fmt: skip
    from condnoise.training.runtime import cleanup_distributed

    cleanup_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned to step {result.step}; adapter run: {result.run_dir}")
    return 0
