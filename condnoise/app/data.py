"""``condnoise corrupt`` (a condition-corruption manifest, paper section 2) and
``condnoise data check`` (is Fashion-MNIST installed?, used by ``make setup``)."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Any

from condnoise.app.common import (
    add_group_parser,
    add_parser,
    add_progress_option,
    float_range,
    seed_int,
    show_progress,
)

KIND_CHOICES = ("symmetric", "asymmetric", "swap", "rewrite")  # = corruption.KINDS


def register(subparsers: Any) -> None:
    _register_corrupt(subparsers)
    _register_data(subparsers)


def _register_data(subparsers: Any) -> None:
    _, dsub = add_group_parser(subparsers, "data", "ACTION",
                               help="data utilities (check that Fashion-MNIST is installed)")
    check = add_parser(dsub, "check", help="exit 0 when Fashion-MNIST is found, else say how to get it",
                       description="Look for the Fashion-MNIST IDX files (--data-dir, "
                                   "$CONDNOISE_DATA, the Debian package dataset-fashion-mnist).")
    check.add_argument("--data-dir", default=None, help="folder holding the IDX files")
    check.set_defaults(func=run_data_check)


def run_data_check(args: argparse.Namespace) -> int:
    from condnoise.data.fashion_mnist import find_data_dir

    print(f"Fashion-MNIST found in {find_data_dir(args.data_dir)}")
    return 0


def _register_corrupt(subparsers: Any) -> None:
    p = add_parser(
        subparsers,
        "corrupt",
        help="corrupt a fraction of a dataset's conditions (writes a manifest, no images)",
        description=(
            "Corrupt exactly round(RATIO * N) conditions of DATA and write OUT/manifest.csv "
            "(index,original,corrupted; one row per corrupted sample), OUT/summary.json and "
            "OUT/provenance.json. Training reads source + manifest as a view.\n\n"
            "DATA: fashion-mnist, digits, scenes[:seed=N], imagefolder:PATH, captions:PATH, "
            "wds:PATTERN.\n"
            "Kinds: symmetric / asymmetric (class labels), swap / rewrite (captions).\n"
            "Asymmetric: RATIO is a fraction of the whole dataset, drawn only from the --classes "
            "subset (Fashion-MNIST default: T-shirt/top,Pullover,Coat,Shirt)."
        ),
    )
    p.add_argument("data", metavar="DATA", help="data source spec")
    p.add_argument("--kind", choices=KIND_CHOICES, required=True, help="corruption kind")
    p.add_argument("--ratio", type=float_range(0, 1), required=True,
                   help="fraction of samples to corrupt, in [0, 1] (paper: 0.025 to 0.2)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (numpy PCG64)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--classes", default=None,
                   help="asymmetric only: comma-separated class names (or indices) of the subset")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST IDX files (None: the Debian package)")
    p.add_argument("--rewriter", default=None, metavar="NAME|MODULE:NAME",
                   help="rewrite only: a built-in rewriter (rule; for scenes also attributes, "
                        "paraphrase: same attributes, other words) or a Rewriter to import "
                        "(callable, or class built without arguments); None: attributes for "
                        "scenes, rule otherwise")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking that every image file of a file-based source decodes")
    add_progress_option(p)
    p.set_defaults(func=run_corrupt)


def load_rewriter(spec: str):
    """Import ``module:name``; classes are instantiated without arguments."""
    from condnoise.errors import UserError

    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--rewriter must look like module:name, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import rewriter {spec!r}: {e}") from None
    obj = obj() if isinstance(obj, type) else obj
    if not callable(obj):
        raise UserError(f"rewriter {spec!r} is not callable")
    return obj


def run_corrupt(args: argparse.Namespace) -> int:
    from condnoise.data.manifest import MANIFEST
    from condnoise.errors import UserError
    from condnoise.locks import folder_lock

    start = time.perf_counter()
    if (args.out / MANIFEST).exists() and not args.force:
        raise UserError(f"{args.out / MANIFEST} already exists; pass --force to overwrite it")
    if args.rewriter and args.kind != "rewrite":
        raise UserError("--rewriter applies only to --kind rewrite")
    rewriter = args.rewriter  # a built-in name, resolved by corrupt()
    if args.rewriter and ":" in args.rewriter:
        rewriter = load_rewriter(args.rewriter)
    with folder_lock(args.out, "corrupt"):
        source, summary, classes = _corrupt_and_save(args, rewriter)
    elapsed = time.perf_counter() - start
    print(
        f"corrupted {summary['n_corrupted']:,} of {summary['n']:,} {source.meta.condition_kind} "
        f"conditions of {source.meta.name} ({args.split}) with {args.kind} "
        f"(ratio {args.ratio}, seed {args.seed}) in {elapsed:.1f} s"
    )
    if summary["class_counts_after"]:
        before, after = summary["class_counts_before"], summary["class_counts_after"]
        changes = [f"{k} {before[k]}->{after[k]}" for k in before if before[k] != after[k]]
        print("class counts: " + (", ".join(changes) if changes else "unchanged"))
    extra = "".join(f", {name}" for name in summary["sidecars"])
    print(f"wrote {args.out / MANIFEST}, summary.json, provenance.json{extra}")
    return 0


def _corrupt_and_save(args: argparse.Namespace, rewriter: Any) -> tuple[Any, dict, list | None]:
    """Open the source, corrupt it, verify file-based images, save the manifest."""
    from condnoise.data.corruption import corrupt
    from condnoise.data.sources import open_source

    source = open_source(args.data, args.split, data_dir=args.data_dir)
    classes = None
    if args.classes is not None:
        classes = [c for c in args.classes.split(",") if c.strip()]
    manifest = corrupt(source, args.kind, args.ratio, args.seed, classes=classes, rewriter=rewriter)
    if hasattr(source, "verify_images") and not args.no_verify:
        source.verify_images(progress=show_progress(args))
    config = {
        "command": "corrupt", "data": args.data, "source": source.meta.name,
        "split": args.split, "kind": args.kind, "ratio": args.ratio, "seed": args.seed,
        "classes": classes, "rewriter": args.rewriter, "data_dir": args.data_dir,
        "out": str(args.out),
    }  # fmt: skip
    summary = manifest.save(args.out, source.conditions(), force=args.force, config=config)
    return source, summary, classes
