"""``condnoise sample`` (guidance sweeps) and ``condnoise walk`` (noise circles, Fig. 5)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from condnoise.app.common import (
    add_device_option,
    add_parser,
    add_progress_option,
    float_range,
    int_range,
    nonneg_int,
    positive_int,
    seed_int,
    show_progress,
    typed_list,
)

SAMPLER_CHOICES = ("ddpm", "ddim", "dpm++", "lcm")  # = samplers.SAMPLERS (no torch import for --help)
CLIP_CHOICES = ("auto", "on", "off")


def register(subparsers: Any) -> None:
    p = add_parser(
        subparsers,
        "sample",
        help="generate samples of a trained run for a sweep of guidance scales",
        description=(
            "Generate --num samples per guidance scale into OUT/s{scale}/ (samples.npz, "
            "meta.json, grid.png). Sample i gets its noise from seed hash(seed, i) and class "
            "i % K (balanced), or for a text run prompt i % P of --prompt / --prompts / "
            "--captions-from, so two runs with the same --seed are paired. Several --steps "
            "counts write OUT/steps{n}/s{scale}/ each. Resumable shard by "
            "shard; under torchrun each rank makes every world-th shard, rank 0 merges. "
            "--pipeline samples a diffusers LDMTextToImagePipeline / DiTPipeline folder "
            "(e.g. the paper's released models) the same way."
        ),
    )
    _add_run_options(p, pipeline=True)
    p.add_argument("--guidance", default="1.5,2,3",
                   help="comma-separated CFG scales s (1 = conditional only, 0 = unconditional)")
    p.add_argument("--num", "--num-samples", dest="num", type=positive_int, default=1000,
                   help="samples per guidance scale (under torchrun spell it --num-samples: "
                        "torchrun reads --num as its own --numa-binding)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="dpm++",
                   help="ddpm (ancestral), ddim (eta=0), dpm++ (DPM-Solver++ 2M) or lcm (an LCM "
                        "student of `condnoise distill lcm`: guidance through its guidance "
                        "embedding, one forward per step)")
    p.add_argument("--steps", type=typed_list(int, "steps", positive_int), default=[50],
                   metavar="N[,N...]",
                   help="sampler steps; several (e.g. 1,2,4,8) write one OUT/steps{n}/ folder each")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="sweep seed (per-sample noise and classes)")
    p.add_argument("--classes", default="balanced",
                   help="'balanced' (index i -> class i %% K), 'random' (from the seed), or a "
                        "comma-separated list of class names / indices used round-robin")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text runs: a prompt (repeatable; sample i gets prompt i %% P)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="text runs: a file of prompts, one per line")
    p.add_argument("--captions-from", default=None, metavar="SPLIT",
                   help="text runs: the captions of this split of the data (sample i gets caption "
                        "i, paired with its image; captions and source indices are saved)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="data source of --captions-from (None: the run's training source)")
    p.add_argument("--controls-from", default=None, metavar="SPLIT",
                   help="spatial controls from this split's images (of --data): sample i gets the "
                        "control and the condition (class or caption) of item i %% P, P = min(--num, "
                        "split size); an adapter run (`condnoise finetune`) is fed them, a base run "
                        "only records them (the without-control baseline); samples.npz gains "
                        "controls and control_indices, OUT/s{scale}/controls.png shows the pairs")
    p.add_argument("--control", choices=("canny", "mask"), default=None,
                   help="the control kind of --controls-from (None: the adapter run's; required "
                        "for a base run)")
    p.add_argument("--control-scale", type=float_range(0), default=1.0,
                   help="scale of the adapter's residuals (ControlNet conditioning_scale)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per sampler batch")
    p.add_argument("--shard-size", type=positive_int, default=1000,
                   help="images per shard file (the unit of resume and of torchrun work)")
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--grid-per-class", type=nonneg_int, default=8,
                   help="images per class row in grid.png (0: no grid)")
    p.add_argument("--keep-shards", action="store_true",
                   help="keep shards/ after merging into samples.npz")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision of the model forward")
    add_progress_option(p)
    p.set_defaults(func=run_sample)

    w = add_parser(
        subparsers,
        "walk",
        help="images along a closed circle in the initial-noise space (paper Fig. 5)",
        description=(
            "x(theta) = cos(theta) z1 + sin(theta) z2 for theta = 2 pi k / FRAMES: every frame is "
            "a standard Gaussian and the loop closes. Writes OUT/walk_{class}_s{scale}.png "
            "(one row per circle), .npz (images, thetas, label) and .json."
        ),
    )
    _add_run_options(w)
    w.add_argument("--class", dest="class_name", required=True,
                   help="class name (case-insensitive) or index")
    w.add_argument("--frames", type=int_range(2), default=16, help="frames per circle")
    w.add_argument("--rows", type=positive_int, default=1,
                   help="independent circles (rows of the strip)")
    w.add_argument("--seed", type=seed_int, default=0, help="seed of the circles' noise (z1, z2)")
    w.add_argument("--guidance", type=float_range(0), default=2.0, help="CFG scale s")
    w.add_argument("--sampler", choices=("ddim", "dpm++"), default="ddim",
                   help="deterministic sampler")
    w.add_argument("--steps", type=positive_int, default=50, help="sampler steps")
    w.add_argument("--out", type=Path, default=None, help="output folder (None: RUN_DIR/walks)")
    w.set_defaults(func=run_walk)


def _add_run_options(p: argparse.ArgumentParser, pipeline: bool = False) -> None:
    if pipeline:
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?", default=None,
                       help="training run directory (or give --pipeline)")
        p.add_argument("--pipeline", type=Path, default=None, metavar="PATH",
                       help="a diffusers LDMTextToImagePipeline or DiTPipeline folder instead of a run")
    else:
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--step", type=nonneg_int, default=None,
                   help="checkpoint step to load (None: the latest)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="EMA or raw model weights")
    add_device_option(p, "torch device (None: cuda when available, else cpu)")
    p.add_argument("--clip-x0", choices=CLIP_CHOICES, default="auto",
                   help="clip predicted x0 to [-1,1] each step (auto: on in pixel space only)")


def _clip(choice: str, autoencoder: Any) -> bool:
    from condnoise.diffusion.sampling import is_pixel_space

    return {"on": True, "off": False}.get(choice, is_pixel_space(autoencoder))


def _prompts(args: argparse.Namespace, data: Any) -> Any:
    """The ``Prompts`` of --prompt / --prompts / --captions-from (None: none given); ``data``:
    the run's data section (None for a pipeline)."""
    from condnoise.diffusion.sampling import Prompts, read_prompt_file
    from condnoise.errors import UserError

    given = [n for n, v in (("--prompt", args.prompt), ("--prompts", args.prompts),
                            ("--captions-from", args.captions_from)) if v]  # fmt: skip
    if len(given) > 1:
        raise UserError(f"give one of --prompt, --prompts, --captions-from (got {', '.join(given)})")
    if given and args.classes != "balanced":
        raise UserError(f"--classes is for class runs; {given[0]} gives a text run its prompts")
    if args.prompt:
        return Prompts(list(args.prompt), "prompt")
    if args.prompts is not None:
        return read_prompt_file(args.prompts)
    if args.captions_from:
        from condnoise.training.splits import split_prompts

        spec = args.data or (data.source if data is not None else None)
        if spec is None:
            raise UserError("--captions-from needs --data SPEC (the data source of the captions)")
        return split_prompts(spec, args.captions_from, getattr(data, "data_dir", None))
    return None


def _controls(args: argparse.Namespace, config: Any) -> Any:
    """The ``(ControlSet, labels or None, Prompts or None)`` of --controls-from (None: not
    given): the split's first P = min(--num, size) items, their native controls (the run's
    control settings, or --control for a base run) and conditions."""
    from condnoise.errors import UserError

    if args.controls_from is None:
        if args.control is not None or args.control_scale != 1.0:
            raise UserError("--control / --control-scale need --controls-from SPLIT")
        return None
    if config is None:
        raise UserError("--controls-from samples a training run (RUN_DIR), not a --pipeline")
    if args.prompt or args.prompts or args.captions_from or args.classes != "balanced":
        raise UserError("--controls-from pairs each sample with its split item's condition: drop "
                        "--classes / --prompt / --prompts / --captions-from")  # fmt: skip
    from condnoise.training.splits import split_controls

    return split_controls(config, args.controls_from, args.num, kind=args.control,
                          scale=args.control_scale, data=args.data)


def _load(args: argparse.Namespace, device: Any) -> Any:
    """A training run, or with --pipeline a diffusers pipeline folder, ready to sample."""
    from condnoise.training.runtime import load_run

    if args.pipeline is not None:
        from condnoise.training.pipelines import load_pipeline

        return load_pipeline(args.pipeline, device=device)
    return load_run(args.run_dir, ema=args.weights == "ema", device=device, step=args.step)


def _run_facts(run_dir: Path) -> tuple[list[str], int, Any]:
    """The class names (empty for a text run), training noise steps and config of a run,
    read without loading its model."""
    from condnoise.errors import UserError
    from condnoise.training.rundir import read_run_config, read_run_info

    if not Path(run_dir).is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    names = read_run_info(run_dir).get("class_names")
    if not isinstance(names, list):
        raise UserError(f"{Path(run_dir) / 'run.json'}: no class_names list")
    config = read_run_config(run_dir)
    return [str(n) for n in names], config.diffusion.num_steps, config


def _check_lcm(sampler: str, steps: list[int], config: Any, guidances: list[float]) -> None:
    """--sampler lcm needs an LCM student and at most its grid's N steps (checked before
    loading); a warning for a student sampled otherwise or outside its distilled guidance range."""
    import warnings

    from condnoise.errors import CondnoiseWarning, UserError

    lcm = getattr(config.model, "lcm", None)
    if sampler == "lcm" and lcm is None:
        raise UserError("--sampler lcm needs an LCM student (a run made by `condnoise distill lcm`); "
                        "sample this run with ddpm, ddim or dpm++")  # fmt: skip
    if sampler == "lcm" and max(steps) > lcm.solver_steps:
        raise UserError(f"--steps {max(steps)}: this LCM student was distilled on a {lcm.solver_steps}-step "
                        f"grid and samples in at most {lcm.solver_steps} steps")  # fmt: skip
    if lcm is not None and sampler != "lcm":
        warnings.warn(f"this run is an LCM student: --sampler {sampler} treats it as a diffusion model; "
                      "--sampler lcm samples it as distilled", CondnoiseWarning, stacklevel=2)  # fmt: skip
    d = getattr(config, "distill", None)
    outside = [g for g in guidances if d is not None and not d.guidance_min <= g <= d.guidance_max]
    if sampler == "lcm" and outside:
        warnings.warn(f"--guidance {outside[0]:g} lies outside the range the student was distilled on "
                      f"({d.guidance_min:g} to {d.guidance_max:g})", CondnoiseWarning, stacklevel=2)  # fmt: skip


def run_sample(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses

    from condnoise.diffusion.sampling import SweepConfig, parse_guidance, run_sweep, scale_dirname
    from condnoise.diffusion.seeding import parse_classes
    from condnoise.errors import UserError
    from condnoise.locks import folder_lock
    from condnoise.provenance import write_provenance
    from condnoise.training.runtime import barrier, cleanup_distributed, init_distributed

    guidances = parse_guidance(args.guidance)
    if (args.run_dir is None) == (args.pipeline is None):
        raise UserError("sample: give a RUN_DIR or --pipeline PATH (one of them)")
    facts = _run_facts(args.run_dir) if args.run_dir is not None else None
    controls = _controls(args, facts[2] if facts else None)
    prompts = _prompts(args, facts[2].data if facts else None)
    classes = "balanced" if prompts or facts is None else parse_classes(args.classes, facts[0])
    if controls is not None:
        controls, labels, prompts = controls
        classes = labels if labels is not None else "balanced"
    steps = _step_counts(args.steps)
    cfg = SweepConfig(
        guidances=guidances, num=args.num, sampler=args.sampler, steps=steps[0],
        seed=args.seed, classes=classes, batch_size=args.batch_size,
        shard_size=args.shard_size, precision=args.precision, png=args.png,
        grid_per_class=args.grid_per_class, keep_shards=args.keep_shards, prompts=prompts,
        controls=controls,
    )  # fmt: skip
    for n in steps if facts is not None else ():  # every setting checked before the model loads
        dataclasses.replace(cfg, steps=n).validate(facts[1])
    if facts is not None:
        _check_lcm(args.sampler, steps, facts[2], guidances)
    info = init_distributed(args.device)
    lock = folder_lock(args.out, "sample") if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            run = _load(args, info.device)
            if facts is None:  # a pipeline: its classes and schedule are known now
                cfg.classes = "balanced" if prompts else parse_classes(args.classes, run.class_names)
                for n in steps:
                    dataclasses.replace(cfg, steps=n).validate(len(run.schedule.betas))
            cfg.clip_x0 = _clip(args.clip_x0, run.autoencoder)
            source = run.run_dir
            if info.is_main:
                config = {**vars(cfg), "steps": steps if len(steps) > 1 else steps[0],
                          "prompts": prompts.source if prompts else None,
                          "controls": controls.info() if controls else None,
                          "run_dir": str(source), "checkpoint_step": run.step,
                          "weights": args.weights, "world_size": info.world_size}  # fmt: skip
                write_provenance(args.out, config, args.seed)
            done = []
            for n in steps:
                out = args.out if len(steps) == 1 else args.out / f"steps{n}"
                folders = run_sweep(
                    run, source, out, dataclasses.replace(cfg, steps=n), rank=info.rank,
                    world_size=info.world_size, barrier=(lambda: barrier(info)),
                    ema=args.weights == "ema", progress=show_progress(args),
                )  # fmt: skip
                done += [(n, g, f) for g, f in zip(guidances, folders)]
    finally:
        cleanup_distributed()
    if info.is_main:
        for n, g, folder in done:
            many = f", {n} steps" if len(steps) > 1 else ""
            print(f"s={g:g}{many}: {folder / 'samples.npz'} ({scale_dirname(g)})")
    return 0


def _step_counts(steps: list[int]) -> list[int]:
    """--steps values, each once (UserError on a repeat)."""
    from condnoise.errors import UserError

    if len(set(steps)) != len(steps):
        raise UserError(f"--steps {','.join(map(str, steps))}: a step count is given twice")
    return list(steps)


def run_walk(args: argparse.Namespace) -> int:
    import numpy as np

    from condnoise.diffusion.grids import safe_name, save_grid
    from condnoise.diffusion.samplers import check_sampler
    from condnoise.diffusion.sampling import latent_shape
    from condnoise.diffusion.seeding import class_index
    from condnoise.diffusion.walk import noise_walk
    from condnoise.io import atomic_open, write_json
    from condnoise.locks import folder_lock
    from condnoise.provenance import write_provenance
    from condnoise.training.runtime import load_run, pick_device

    class_names, num_steps, _ = _run_facts(args.run_dir)
    k = class_index(args.class_name, class_names)
    check_sampler(args.sampler, args.steps, num_steps)
    out = args.out if args.out is not None else Path(args.run_dir) / "walks"
    with folder_lock(out, "walk"):
        run = load_run(args.run_dir, ema=args.weights == "ema", device=pick_device(0, args.device),
                       step=args.step)  # fmt: skip
        clip = _clip(args.clip_x0, run.autoencoder)
        images, thetas = noise_walk(
            run.model, run.schedule, run.autoencoder, k, shape=latent_shape(run),
            frames=args.frames, rows=args.rows, seed=args.seed, guidance=args.guidance,
            sampler=args.sampler, steps=args.steps, clip_x0=clip,
        )  # fmt: skip
        stem = f"walk_{safe_name(run.class_names[k])}_s{args.guidance:g}"
        save_grid(images, out / f"{stem}.png", nrow=args.frames)
        with atomic_open(out / f"{stem}.npz", "wb") as f:
            np.savez(f, images=images, thetas=thetas, label=np.int64(k))
        config = {
            "run_dir": str(args.run_dir), "checkpoint_step": run.step, "weights": args.weights,
            "class": run.class_names[k], "class_index": k, "frames": args.frames,
            "rows": args.rows, "seed": args.seed, "guidance": args.guidance,
            "sampler": args.sampler, "steps": args.steps, "clip_x0": clip,
        }  # fmt: skip
        write_json(out / f"{stem}.json", {**config, "thetas": thetas.tolist()})
        write_provenance(out, config, args.seed)
    print(f"walk: {out / f'{stem}.png'} ({args.rows} x {args.frames} frames)")
    return 0
