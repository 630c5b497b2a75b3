"""``condnoise study PRESET_OR_YAML`` and ``condnoise demo`` (the ``make demo`` entry)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from condnoise.app.common import (
    add_device_option,
    add_parser,
    add_progress_option,
    positive_int,
    show_progress,
)

DEMO_PRESET = "fmnist-quick"
TEXT_DEMO_PRESET = "scenes-quick"  # `condnoise demo --text`


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="study folder (default: the preset's out_dir or runs/study/NAME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (cells, status, estimated cost) and exit")
    p.add_argument("--stage", action="append", default=None, metavar="STAGE",
                   help="run only this stage (autoencoder, corrupt, train, pretrained, distill, finetune, "
                        "sample, evaluate, walk, theory, report); repeatable")  # fmt: skip
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only cells whose id contains TEXT (e.g. cep-u, seed0, s3) plus "
                        "their dependencies; repeatable")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="override a study field, e.g. --set seeds=[0,1,2] --set "
                        "sample.num_samples=500 --set lock_timeout=1800 (seconds without a "
                        "heartbeat before another worker takes a running cell over; the "
                        "study's default is 600)")  # fmt: skip
    add_device_option(p, "torch device for every cell (None: cuda if present, else cpu; "
                         "under torchrun cuda:LOCAL_RANK)")
    add_progress_option(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_parser(
        subparsers,
        "study",
        help="run a cached, resumable study grid and write its report",
        description=(
            "corrupt -> train -> sample -> evaluate -> report over a preset's grid. Every cell "
            "is cached under its config hash: rerunning skips finished cells and a killed "
            "study resumes where it stopped. Under torchrun every rank runs whole cells on "
            "its own GPU."
        ),
    )
    p.add_argument("study", metavar="PRESET_OR_YAML",
                   help="a preset (micro, fmnist-quick, fmnist-medium, fmnist-full, fmnist-lcm, "
                        "fmnist-ldm, scenes-quick, cc3m-ldm4, in1k-dit-xl2, in1k-ldm4, cc3m-lcm) or a study YAML file")  # fmt: skip
    _add_common(p)
    p.add_argument("--submit", choices=("slurm", "local"), default=None, metavar="ENGINE",
                   help="hand the cells to a job engine through submitit instead of running "
                        "them here: slurm (one sbatch job per cell, afterok dependencies, the "
                        "report last; resources from the study's slurm section) or local "
                        "(the same jobs as local processes, in waves; waits for them). A "
                        "second --submit skips finished, running and queued cells; with "
                        "--dry-run, print the sbatch plan")  # fmt: skip
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="--submit local: jobs running at once")
    p.add_argument("--status", action="store_true",
                   help="print every cell's state (done / running where / queued / failed "
                        "with its log's last line / todo) and exit")  # fmt: skip
    p.set_defaults(func=run_study_command)

    d = add_parser(
        subparsers,
        "demo",
        help=f"run the {DEMO_PRESET} study (about 24 minutes on 2 idle CPU cores) and print the report path",
        description=f"`make demo`: the {DEMO_PRESET} study end to end, then where its report is.",
    )
    d.add_argument("--preset", default=None,
                   help=f"study preset or YAML file to run (None: {DEMO_PRESET}, with --text "
                        f"{TEXT_DEMO_PRESET})")
    d.add_argument("--text", action="store_true",
                   help=f"the text-to-image demo: the {TEXT_DEMO_PRESET} study (captions on "
                        "scenes, scenes-clip / recognizer metrics)")
    _add_common(d)
    d.set_defaults(func=run_demo_command)


def run_study_command(args: argparse.Namespace) -> int:
    from condnoise.study.grid import format_seconds
    from condnoise.study.runner import default_study_dir, plan, run_study
    from condnoise.study.spec import load_study

    spec = load_study(args.study, args.overrides)
    study_dir = Path(args.out) if args.out else default_study_dir(spec)
    if getattr(args, "status", False):
        from condnoise.study.submit import status_text

        print(status_text(spec, study_dir, stages=args.stage, only=args.only))
        return 0
    if getattr(args, "submit", None):
        return _submit_command(args, spec, study_dir)
    if args.dry_run:
        print(plan(spec, study_dir, stages=args.stage, only=args.only))
        return 0
    t0 = time.perf_counter()
    result = run_study(spec, study_dir, stages=args.stage, only=args.only, device=args.device,
                       progress=show_progress(args))  # fmt: skip
    print(
        f"study {spec.name}: ran {len(result.ran)} cell(s), {len(result.skipped)} already done, "
        f"in {format_seconds(time.perf_counter() - t0)}"
    )
    if result.report:
        print(f"report: {result.report.resolve()}")
        print(f"        {result.report.with_suffix('.md').resolve()} (Markdown), "
              f"{(result.report.parent / 'results.csv').resolve()} (CSV)")  # fmt: skip
    return 0


def _submit_command(args: argparse.Namespace, spec, study_dir: Path) -> int:
    """``--submit ENGINE``: submit (or, with --dry-run, print) the plan; 1 if a local job failed."""
    from condnoise.study.submit import make_plan, sbatch_plan, submit, submitit_module

    submitit_module()
    if args.dry_run:
        print(sbatch_plan(spec, study_dir, make_plan(spec, study_dir, stages=args.stage,
                                                     only=args.only)))  # fmt: skip
        return 0
    done = submit(spec, study_dir, args.submit, stages=args.stage, only=args.only,
                  device=args.device, jobs=args.jobs)  # fmt: skip
    print(f"study {spec.name}: {len(done.jobs)} job(s) submitted ({args.submit}), "
          f"{len(done.skipped)} cell(s) skipped, {len(done.failed)} failed; job logs under "
          f"{study_dir / 'jobs'}; `condnoise study {args.study} --status` shows each cell")  # fmt: skip
    if done.report:
        print(f"report: {done.report.resolve()}")
    return 1 if done.failed else 0


def run_demo_command(args: argparse.Namespace) -> int:
    if args.text and args.preset:
        from condnoise.errors import UserError

        raise UserError(f"demo: --text runs {TEXT_DEMO_PRESET}; give --preset {args.preset} "
                        "without --text")
    args.study = args.preset or (TEXT_DEMO_PRESET if args.text else DEMO_PRESET)
    return run_study_command(args)
