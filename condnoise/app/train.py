"""``condnoise train``: train a class- or text-conditional diffusion model from a preset or YAML file."""

from __future__ import annotations

import argparse

from condnoise.app.common import (
    TRAIN_FLAGS,
    IntermixedParser,
    add_device_option,
    add_parser,
    add_progress_option,
    flag_overrides,
    float_range,
    positive_int,
    seed_int,
    show_progress,
    status_printer,
)

EPILOG = """\
examples:
  condnoise train fmnist-dit-s --perturb cep-u                 # CEP-U, gamma 1 (paper section 3)
  condnoise train fmnist-dit-s --perturb cep-g --gamma 0.5 train.steps=1000 train.lr=5e-4
  condnoise train fmnist-dit-s --corruption runs/corrupt-sym-5  # fixed label corruption (section 2)
  condnoise train fmnist-dit-s --perturb cep-u --resume         # continue after a crash / kill -9
  condnoise train scenes-unet-s --perturb cep-u                # text: CEP-U on the caption tokens
  condnoise train scenes-unet-s 'data.source=wds:shards/{000..009}.tar'   # streamed caption shards
  torchrun --nproc_per_node 2 -m condnoise train fmnist-dit-s   # DDP (gloo on CPU, NCCL on GPU)

key=value overrides use dotted config keys (values parsed as YAML), e.g. train.batch_size=64,
model.perturbation.gamma=0.5, data.max_samples=10000. Presets: fmnist-dit-s, fmnist-unet-s,
scenes-unet-s, scenes-dit-s, scenes-conv32 (CPU; scenes: captions), in1k-dit-xl2, in1k-ldm4 (GPU, ImageNet
via imagefolder:/wds:).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_parser(
        subparsers,
        "train",
        help="train a class- or text-conditional diffusion model (DiT / U-Net) with optional CEP",
        description=__doc__,
        epilog=EPILOG,
    )
    p.__class__ = IntermixedParser
    p.add_argument("config", metavar="PRESET_OR_YAML", nargs="?",
                   help="preset name (see --list-presets) or YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.lr=2e-4 model.perturbation.gamma=0.5")
    p.add_argument("--run-dir", default=None,
                   help="run directory; None: runs/<preset>-<perturbation>-s<seed>")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="total optimizer steps (overrides train.steps)")
    p.add_argument("--ckpt-every", type=positive_int, default=None,
                   help="checkpoint every K steps (overrides train.ckpt_every)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (overrides train.seed)")
    p.add_argument("--perturb", default=None, metavar="NAME",
                   help="condition perturbation: none, cep-u, cep-g, cep-fixed, dropout, "
                        "label-smoothing, random-flip, ip (sets model.perturbation.name)")
    p.add_argument("--gamma", type=float_range(0), default=None,
                   help="CEP strength gamma (sets model.perturbation.gamma; paper default 1)")
    p.add_argument("--corruption", default=None, metavar="MANIFEST_DIR",
                   help="train on a fixed corruption written by `condnoise corrupt`")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start a new run in a non-empty --run-dir that holds no condnoise run "
                        "(refused otherwise, so that no other files are overwritten)")
    add_device_option(p, "torch device; None: cuda:<LOCAL_RANK> when available, else cpu")
    add_progress_option(p)
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.set_defaults(func=run_train)


def build_overrides(args: argparse.Namespace) -> list[str]:
    """The flag shortcuts as dotted overrides: ``--perturb`` first (it replaces the preset's
    perturbation section), then the positional ``key=value`` items, then the other flags."""
    from condnoise.errors import UserError

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"bad override {bad[0]!r}: expected section.key=value, e.g. train.lr=2e-4")
    out = []
    if args.perturb is not None:
        out.append(f"model.perturbation={{name: {args.perturb}}}")
    out += list(args.overrides)
    if args.gamma is not None:
        out.append(f"model.perturbation.gamma={args.gamma!r}")
    out += flag_overrides(args, TRAIN_FLAGS)
    return out


def run_train(args: argparse.Namespace) -> int:
    from condnoise.training.config import list_presets, load_config

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if not args.config:
        from condnoise.errors import UserError

        raise UserError("train: name a preset or YAML file (presets: " + ", ".join(list_presets()) + ")")
    from condnoise.training.trainer import train

    cfg = load_config(args.config, build_overrides(args))
    if args.corruption is not None:  # paths are set verbatim (not parsed as YAML)
        cfg.data.corruption = args.corruption
    if args.run_dir is not None:
        cfg.run.dir = args.run_dir
    cfg.run.progress = cfg.run.progress and show_progress(args)
    result = train(cfg, resume=args.resume, device=args.device, force=args.force,
                   status=status_printer("train"))  # fmt: skip
    from condnoise.training.runtime import cleanup_distributed

    cleanup_distributed()
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} ({result.img_per_s:.0f} img/s); run: {result.run_dir}")
    return 0
