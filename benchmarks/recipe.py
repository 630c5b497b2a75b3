"""What a CPU-second of training buys: condition accuracy and classifier-FID of the EMA model
against CPU-seconds of training, per candidate training recipe (BENCHMARKS.md, "Recipes").

Every recipe is a trainer config (``condnoise.training.config``) on real Fashion-MNIST,
trained by the package's own ``Trainer.train_step`` (same loss, CFG dropout, AdamW, EMA as
``condnoise train``). Its clock is ``time.process_time()`` of the training process around
the training steps only (the CPU-seconds of every thread of the process; wall time means
nothing on a shared machine). At each budget point (CPU-seconds) the EMA weights are
snapshotted; after training, each snapshot is sampled with the same sampler and the same
number of samples (balanced classes, fixed seeds) and evaluated with the fmnist-classifier
(``condnoise.evaluation.evaluate_samples``: condition accuracy, FID on its 128-d features;
16 x 16 samples are upsampled to 28 and the real reference images pass through the same
pipeline). Extra EMA decays are tracked beside the run's own (same steps, the package's
``EMA``) and evaluated at the last point. ``--samplers`` evaluates the last snapshot of one
recipe with several samplers / step counts.

Run with 2 threads under ``nice -n 5``; ``OMP_WAIT_POLICY=PASSIVE`` is set unless given, so
that threads waiting for a busy core sleep instead of spinning and the CPU-seconds count
work, not waiting::

    nice -n 5 python benchmarks/recipe.py --out /tmp/recipe            # every recipe
    python benchmarks/recipe.py --only conv-xs-16-v --out /tmp/recipe   # one (resumable:
                                                                        # finished recipes are kept)
    python benchmarks/recipe.py --table --out /tmp/recipe --json benchmarks/results/recipe_cpu.json \\
        --plot docs/images/recipe-accuracy-vs-cpu.png                   # table, JSON, plot
    python benchmarks/recipe.py --quick --out /tmp/q                    # CI smoke form (< 1 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BASE: dict[str, Any] = {
    "data": {"source": "fashion-mnist", "image_size": 16},
    "model": {"family": "conv-unet", "size": "xs", "cfg_dropout": 0.1},
    "diffusion": {"schedule": "cosine", "prediction": "v"},
    "train": {"batch_size": 128, "lr": 2.0e-3, "warmup": 100, "ema_decay": 0.999,
              "grad_clip": 1.0, "seed": 0, "log_every": 1000, "ckpt_every": 100000,
              "sample_every": 0},
}  # fmt: skip

#: name -> (description, overrides of BASE as dotted keys). The 32 x 32 recipes sample 4x
#: slower, so only their last two budget points are evaluated; the extra EMA decays and
#: the sampler comparison are evaluated on ``conv-xs-16-v`` only (``--samplers-for``).
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "dit-t4-32": ("pixel DiT-T/4 at 32x32 (the fmnist-dit-s recipe: eps, linear, lr 1e-3)", {
        "data.image_size": 32, "model": {"family": "dit", "size": "T/4", "cfg_dropout": 0.1},
        "diffusion.schedule": "linear", "diffusion.prediction": "eps", "train.lr": 1.0e-3}),
    "conv-xs-16-v": ("conv U-Net xs at 16x16, v, cosine, lr 2e-3, batch 128", {}),
    "conv-xs-16-eps": ("as conv-xs-16-v with eps-prediction", {"diffusion.prediction": "eps"}),
    "conv-xs-16-eps-minsnr": ("eps + min-SNR-5 weighting", {
        "diffusion.prediction": "eps", "diffusion.loss_weighting": "min-snr"}),
    "conv-xs-16-v-minsnr": ("v + min-SNR-5 weighting", {"diffusion.loss_weighting": "min-snr"}),
    "conv-s-32-v": ("conv U-Net s (3 levels) at 32x32 (padded), v, cosine", {
        "data.image_size": 32, "model.size": "s"}),
    "conv-tiny-16-v": ("conv U-Net tiny (16/32 channels) at 16x16, v", {"model.size": "tiny"}),
    "conv-xs-16-v-lr1e-3": ("lr 1e-3", {"train.lr": 1.0e-3}),
    "conv-xs-16-v-lr4e-3": ("lr 4e-3", {"train.lr": 4.0e-3}),
    "conv-xs-16-v-b64": ("batch 64", {"train.batch_size": 64}),
    "conv-xs-16-v-b256": ("batch 256", {"train.batch_size": 256}),
}  # fmt: skip
LAST_TWO_ONLY = ("dit-t4-32", "conv-s-32-v")

FULL = {"points": [60, 120, 240, 420], "num": 500, "sampler": "dpm++", "steps": 10,
        "scales": [2.0], "final_scales": [1.0, 2.0, 3.0], "extra_ema": [0.99, 0.995, 0.9995],
        "samplers": [("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpm++", 10), ("dpm++", 20)],
        "sampler_scale": 2.0, "max_samples": None, "max_ref": 10000, "shrinkage": 0.0}  # fmt: skip
QUICK = {"points": [2, 4], "num": 60, "sampler": "dpm++", "steps": 4, "scales": [2.0],
         "final_scales": [1.0, 2.0], "extra_ema": [0.99], "samplers": [("ddim", 4), ("dpm++", 4)],
         "sampler_scale": 2.0, "max_samples": 2000, "max_ref": 1000, "shrinkage": 0.05}  # fmt: skip
QUICK_RECIPES = {"quick-tiny-16-v": ("smoke: conv U-Net tiny at 16x16, v, min-SNR", {
    "model.size": "tiny", "diffusion.loss_weighting": "min-snr", "train.batch_size": 32,
    "train.warmup": 0})}  # fmt: skip


def recipe_config(overrides: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """BASE with the recipe's overrides (dotted keys; a mapping replaces a section key)."""
    raw = copy.deepcopy(BASE)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node.setdefault(k, {})
        node[last] = copy.deepcopy(value)
    if settings["max_samples"]:
        raw["data"]["max_samples"] = settings["max_samples"]
    return raw


# --------------------------------------------------------------------------- training


def train_with_snapshots(name: str, raw: dict[str, Any], settings: dict[str, Any],
                         run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Train until the last budget point; EMA state dicts at every point (CPU-seconds)."""

    from condnoise.training.config import Config
    from condnoise.training.ema import EMA
    from condnoise.training.trainer import Trainer

    raw = copy.deepcopy(raw)
    raw["run"] = {"name": name, "dir": str(run_dir), "tensorboard": False, "progress": False}
    raw["train"]["steps"] = 10**7  # stopped by the CPU budget
    cfg = Config.from_dict(raw, origin=f"recipe {name}").validate(f"recipe {name}")
    trainer = Trainer(cfg, run_dir=run_dir, device="cpu")
    extra = {d: EMA(trainer.model, d, warmup=cfg.train.ema_warmup) for d in settings["extra_ema"]}
    t = cfg.train
    stream = trainer.data.micro_batches(trainer.position, t.batch_size, t.grad_accum, 1, 0, 0)
    points, snaps, cpu, last_loss = list(settings["points"]), [], 0.0, math.nan
    losses = []
    while points:
        c0 = time.process_time()
        loss, _ = trainer.train_step(stream)
        trainer.position = trainer.data.order.take(trainer.position, t.batch_size)[1]
        for e in extra.values():
            e.update(trainer.step - 1)
        last_loss = float(loss)
        cpu += time.process_time() - c0
        losses.append(last_loss)
        if cpu >= points[0]:
            points.pop(0)
            state = {"main": copy.deepcopy(trainer.ema.module.state_dict())}
            if not points:
                state |= {f"ema{d:g}": copy.deepcopy(e.module.state_dict()) for d, e in extra.items()}
            snaps.append({"cpu_seconds": cpu, "step": trainer.step,
                          "images": trainer.step * t.batch_size, "state": state,
                          "loss_last100": float(sum(losses[-100:]) / len(losses[-100:]))})  # fmt: skip
    return {"trainer": trainer, "snapshots": snaps, "params": sum(p.numel() for p in trainer.model.parameters())}


# --------------------------------------------------------------------------- evaluation


def evaluate_state(trainer: Any, state: dict, settings: dict[str, Any], scale: float,
                   sampler: str, steps: int) -> dict[str, float]:  # fmt: skip
    """Sample ``settings['num']`` balanced images with ``state`` and score them."""
    import numpy as np

    from condnoise.diffusion.sampling import generate
    from condnoise.diffusion.seeding import requested_labels
    from condnoise.evaluation.evaluate import EvalConfig, Samples, evaluate_samples

    model = trainer.ema.module
    model.load_state_dict(state)
    model.eval()
    n = int(settings["num"])
    labels = requested_labels(0, range(n), trainer.num_classes, "balanced")
    c0 = time.process_time()
    images = generate(model, trainer.schedule, trainer.autoencoder, range(n), labels,
                      shape=trainer.latent_shape, guidance=scale, sampler=sampler, steps=steps,
                      seed=0, batch_size=500, clip_x0=True)  # fmt: skip
    sample_cpu = time.process_time() - c0
    cfg = EvalConfig(metrics=("fid", "condition-accuracy"), max_ref=settings["max_ref"],
                     shrinkage=settings["shrinkage"])
    rec = evaluate_samples(Samples(Path("."), images, np.asarray(labels)), cfg).record["metrics"]
    return {"accuracy": rec["condition_accuracy"]["fmnist-classifier"],
            "fid": rec["fid"]["fmnist-classifier"],
            "real_accuracy": rec["real_accuracy"]["fmnist-classifier"],
            "real_accuracy_native": rec["real_accuracy_native"]["fmnist-classifier"],
            "sample_cpu_seconds": round(sample_cpu, 2)}  # fmt: skip


def run_recipe(name: str, desc: str, overrides: dict[str, Any], settings: dict[str, Any],
               out: Path, samplers: bool) -> dict[str, Any]:  # fmt: skip
    """Train one recipe, evaluate its snapshots (and samplers); JSON-ready result."""
    import shutil

    import torch

    raw = recipe_config(overrides, settings)
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    trained = train_with_snapshots(name, raw, settings, run_dir)
    trainer, snaps = trained["trainer"], trained["snapshots"]
    sampler, steps = settings["sampler"], int(settings["steps"])
    points = []
    for i, snap in enumerate(snaps):
        final = i == len(snaps) - 1
        if name in LAST_TWO_ONLY and i < len(snaps) - 2:
            continue
        scales = settings["final_scales"] if final else settings["scales"]
        evals = {f"{s:g}": evaluate_state(trainer, snap["state"]["main"], settings, s, sampler, steps)
                 for s in scales}  # fmt: skip
        point = {k: snap[k] for k in ("cpu_seconds", "step", "images", "loss_last100")} | {"eval": evals}
        if final and samplers:
            s = settings["scales"][0]
            point["ema"] = {k: evaluate_state(trainer, st, settings, s, sampler, steps)
                            for k, st in snap["state"].items() if k != "main"}  # fmt: skip
            point["samplers"] = {f"{sm}-{st}": evaluate_state(
                trainer, snap["state"]["main"], settings, settings["sampler_scale"], sm, st)
                for sm, st in settings["samplers"]}  # fmt: skip
        points.append(point)
        print(f"{name}: {point['cpu_seconds']:.0f} CPU-s, step {point['step']}: "
              + ", ".join(f"s={k} acc {v['accuracy']:.3f} FID {v['fid']:.1f}" for k, v in evals.items()),
              flush=True)  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"name": name, "description": desc, "config": raw, "params": trained["params"],
            "threads": torch.get_num_threads(), "sampler": f"{sampler} {steps} steps",
            "num_samples": settings["num"], "points": points,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip


# --------------------------------------------------------------------------- report


def best(point: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The guidance scale with the highest condition accuracy at one point."""
    return max(point["eval"].items(), key=lambda kv: kv[1]["accuracy"])


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per recipe (last point, best scale by accuracy) plus its curve."""
    lines = ["| recipe | params | CPU-s | images | acc. at s=2 per point | best s | accuracy | "
             "FID (clf.) | FID at best-FID s | EMA decays (acc. at s=2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        last = r["points"][-1]
        s, e = best(last)
        sf, ef = min(last["eval"].items(), key=lambda kv: kv[1]["fid"])
        curve = " / ".join(f"{p['eval'].get('2', {}).get('accuracy', math.nan):.2f}" for p in r["points"])
        ema = ", ".join(f"{k[3:]}: {v['accuracy']:.2f}" for k, v in last.get("ema", {}).items())
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {last['cpu_seconds']:.0f} | "
                     f"{last['images'] / 1000:.0f}K | {curve} | {s} | {e['accuracy']:.3f} | "
                     f"{e['fid']:.1f} | {ef['fid']:.1f} (s={sf}) | {ema} |")  # fmt: skip
    return "\n".join(lines)


def sampler_table(results: list[dict[str, Any]]) -> str:
    rows = [(r["name"], k, v) for r in results for k, v in r["points"][-1].get("samplers", {}).items()]
    if not rows:
        return ""
    lines = ["| recipe | sampler | accuracy | FID (clf.) | sampling CPU-s |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {v['accuracy']:.3f} | {v['fid']:.1f} | {v['sample_cpu_seconds']:.0f} |"
              for n, k, v in rows]  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from condnoise.io import write_bytes
    from condnoise.plotting import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [p["cpu_seconds"] for p in r["points"]]
        ys = [p["eval"].get("2", {}).get("accuracy", math.nan) for p in r["points"]]
        ax.plot(xs, ys, marker="o", label=r["name"])
    ref = results[0]["points"][-1]["eval"]
    real = next(iter(ref.values()))
    ax.axhline(real["real_accuracy_native"], color="k", ls="--", lw=1, label="real test images (28 px)")
    ax.axhline(real["real_accuracy"], color="gray", ls=":", lw=1, label="real, 16 px round trip")
    ax.set_xlabel("training CPU-seconds (process_time, 2 threads, shared machine)")
    ax.set_ylabel("condition accuracy at s = 2 (EMA)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    write_bytes(path, png_bytes(fig))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="/tmp/condnoise-recipe", help="folder of per-recipe JSON files")
    p.add_argument("--only", action="append", default=None, help="run only this recipe (repeatable)")
    p.add_argument("--quick", action="store_true", help="CI smoke form: one tiny recipe, tiny budgets")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--samplers-for", default="conv-xs-16-v",
                   help="the recipe whose last snapshot is also scored with the extra EMA decays "
                        "and sampled with every sampler")
    p.add_argument("--table", action="store_true", help="only print the tables of finished recipes")
    p.add_argument("--json", default=None, help="also write all finished results to this file")
    p.add_argument("--plot", default=None, help="also write the accuracy-vs-CPU-seconds PNG here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    recipes, settings = (QUICK_RECIPES, QUICK) if args.quick else (RECIPES, FULL)
    if args.quick:
        args.samplers_for = "quick-tiny-16-v"
    names = args.only or list(recipes)
    unknown = sorted(set(names) - set(recipes))
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(recipes)}")
    from condnoise.io import write_json

    for name in [] if args.table else names:
        path = out / f"{name}.json"
        if path.is_file():
            print(f"{name}: done ({path})")
            continue
        desc, over = recipes[name]
        write_json(path, run_recipe(name, desc, over, settings, out, name == args.samplers_for))
    results = [json.loads((out / f"{n}.json").read_text()) for n in recipes if (out / f"{n}.json").is_file()]
    if not results:
        print("no finished recipes yet")
        return 0
    print(table(results))
    print(sampler_table(results))
    if args.json:
        write_json(Path(args.json), {"settings": {k: v for k, v in settings.items()},
                                     "machine": os.uname().nodename, "results": results})  # fmt: skip
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
