"""Training-step throughput of the trainer (``Trainer.train_step``: forward, backward,
clipping, AdamW, EMA) and peak memory, per preset.

Cases:
* ``fmnist-dit-s``, ``fmnist-unet-s``: the CPU presets on real Fashion-MNIST (batch from
  the preset, fp32), always run.
* ``in1k-dit-xl2``: DiT-XL/2 on 32x32x4 latents, 1000 classes, batch 128, bf16 autocast +
  ``torch.compile`` (the paper's recipe, section 4), on synthetic latents; runs only when
  CUDA is present, otherwise skipped with a printed note.

Each case runs in a fresh subprocess so that the CPU peak (process peak RSS) belongs to it
alone; CUDA peaks are ``torch.cuda.max_memory_allocated``. Prints a table and writes JSON::

    python benchmarks/train_step.py --out train_step.json
    python benchmarks/train_step.py --case fmnist-dit-s --steps 10   # one case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ("fmnist-dit-s", "fmnist-unet-s", "in1k-dit-xl2")
GPU_CASES = ("in1k-dit-xl2",)


class SyntheticLatents:
    """Random "pre-extracted latents" with the ``TrainData`` interface (GPU benchmark)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, n: int, seed: int) -> None:
        import numpy as np
        import torch

        from condnoise.data.base import DatasetMeta
        from condnoise.training.data import EpochOrder

        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn((n, *shape), generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        names = tuple(str(i) for i in range(num_classes))
        self.meta = DatasetMeta(
            "synthetic-latents",
            "train",
            names,
            tuple([1.0 / num_classes] * num_classes),
            n,
            shape,
            "class",
        )
        self.num_samples = n
        self.order = EpochOrder(n, seed)
        labels = self.labels.numpy()

        class _DS:
            def conditions(self) -> np.ndarray:
                return labels

        self.dataset = _DS()

    def micro_batches(self, start, batch, accum, world, rank, num_workers=0):
        import torch

        from condnoise.training.data import _PlanSampler

        for part in _PlanSampler(self.order, start, batch, accum, world, rank):
            idx = torch.as_tensor(part)
            yield self.images[idx].pin_memory(), self.labels[idx], idx


def run_case(name: str, steps: int, warmup: int) -> dict[str, Any]:
    import _timing as tm
    import torch

    from condnoise.training.config import load_config
    from condnoise.training.data import Position
    from condnoise.training.trainer import Trainer

    gpu = name in GPU_CASES
    if gpu and not torch.cuda.is_available():
        return {"case": name, "skipped": "CUDA not available (GPU case)"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [
        "train.sample_every=0",
        "train.ckpt_every=1000000",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    data = None
    if gpu:
        overrides += [
            "train.batch_size=128",
            "train.precision=bf16",
            "train.compile=true",
            "model.autoencoder=null",
            "model.latent_shape=null",
        ]
        data = SyntheticLatents((4, 32, 32), 1000, 4096, seed=0)
    cfg = load_config(name, overrides)
    cfg.model.autoencoder = None
    cfg.model.latent_shape = None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, run_dir=Path(tmp) / "run", device=str(device), data=data)
        stream = trainer.data.micro_batches(
            Position(), cfg.train.batch_size, cfg.train.grad_accum, 1, 0, cfg.train.num_workers
        )
        losses: list[float] = []

        def step(_: int) -> None:
            loss, _ = trainer.train_step(stream)
            losses.append(loss)

        tm.reset_peak_memory(device)
        times = tm.time_repeats(step, device, warmup=warmup, repeats=steps)
        peak = tm.peak_memory_gib(device)
        params = sum(p.numel() for p in trainer.model.parameters())
    sec = tm.median(times)
    final = [float(x) for x in losses[-3:]]
    return {
        "case": name,
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"cpu ({torch.get_num_threads()} threads)",
        "model": f"{cfg.model.family} {cfg.model.size}",
        "params_m": round(params / 1e6, 2),
        "batch": cfg.train.batch_size,
        "precision": "bf16" if trainer.autocast_dtype is not None else "fp32",
        "compile": cfg.train.compile,
        "step_s_median": sec,
        "img_per_s": cfg.train.batch_size / sec,
        "peak_gib": peak,
        "peak_kind": tm.peak_memory_kind(device),
        "steps_timed": steps,
        "warmup": warmup,
        "last_losses": final,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--case",
        choices=CASES,
        action="append",
        help="case(s) to run (default: all; GPU cases skip without CUDA)",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per case")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--inline",
        action="store_true",
        help="run the case(s) in this process (no subprocess per case)",
    )
    args = ap.parse_args(argv)
    cases = args.case or list(CASES)
    results = []
    for name in cases:
        if args.inline:
            res = run_case(name, args.steps, args.warmup)
        else:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--inline",
                    "--case",
                    name,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--out",
                    "/dev/stdout",
                ],
                capture_output=True,
                text=True,
                env={**os.environ},
            )
            if out.returncode != 0:
                res = {"case": name, "error": out.stderr.strip().splitlines()[-1:]}
            else:
                res = json.loads(out.stdout.strip().splitlines()[-1])[0]
        results.append(res)
        if "skipped" in res:
            print(f"note: skipping {name}: {res['skipped']}", file=sys.stderr)
    if args.inline and args.out and str(args.out) == "/dev/stdout":
        print(json.dumps(results))
        return 0
    print(
        f"{'case':<14} {'device':<24} {'model':<12} {'batch':>5} {'prec':>5} {'img/s':>8} "
        f"{'step ms':>8} {'peak GiB':>9}"
    )
    for r in results:
        if "img_per_s" not in r:
            print(f"{r['case']:<14} {r.get('skipped') or r.get('error')}")
            continue
        print(
            f"{r['case']:<14} {r['device'][:24]:<24} {r['model']:<12} {r['batch']:>5} "
            f"{r['precision'] + ('+c' if r['compile'] else ''):>5} {r['img_per_s']:>8.1f} "
            f"{1e3 * r['step_s_median']:>8.1f} {r['peak_gib']:>9.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
