"""Training throughput on a latent cache (``data.latents=DIR``) vs encoding every batch.

Same run, same model, same autoencoder: the ``fmnist-dit-s`` preset with ``model.size=T/2``
(16 tokens on the 8x8x3 latents) on the ``fmnist-vq-f4`` autoencoder with quantised latents
(``model.autoencoder.quantize``, so both arms train bitwise the same model, see
tests/test_latent_cache.py). Arm ``on-the-fly`` encodes each batch of Fashion-MNIST
images (``Trainer.train_step`` calls ``autoencoder.encode``); arm ``cache`` reads the
latents that ``condnoise latents extract`` wrote once. The one-off extraction of the
60,000 training images is timed too, so its cost can be set against the saving per step.

The machine is shared, so the figure of merit is CPU-seconds of this process
(``time.process_time``), one torch thread; wall-clock img/s are printed for reference only.
Arms alternate (on-the-fly, cache, on-the-fly, cache, ...) and the median is reported::

    python benchmarks/latent_cache.py --autoencoder runs/ae-fmnist-vq-f4-s0 --out latent_cache.json

Without ``--autoencoder`` a randomly initialised VQ of the ``fmnist-vq-f4`` architecture is
used (the same cost per image: throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def autoencoder_folder(path: str | None, tmp: Path) -> Path:
    """The given folder / run's ``autoencoder/``, or a random fmnist-vq-f4 architecture."""
    from condnoise.models.first_stage import build_first_stage, resolve_folder
    from condnoise.training.autoencoder_config import load_autoencoder_config

    if path:
        return resolve_folder(path)
    m = load_autoencoder_config("fmnist-vq-f4").model
    model = build_first_stage("vq", in_channels=1, image_size=32, downsample=m.downsample,
                              width=m.width, channel_mult=m.channel_mult,
                              layers_per_block=m.layers_per_block,
                              latent_channels=m.latent_channels, codebook_size=m.codebook_size,
                              norm_groups=m.norm_groups, mid_attention=m.mid_attention)
    model.register_to_config(scaling_factor=1.0)
    model.save_pretrained(str(tmp / "vq"))
    return tmp / "vq"


def extract(folder: Path, out: Path) -> dict[str, Any]:
    """Encode the Fashion-MNIST training split once; CPU- and wall-seconds."""
    from condnoise.data.sources import open_source
    from condnoise.models.autoencoder import DiffusersAutoencoder
    from condnoise.training.latent_cache import extract_latents

    ae = DiffusersAutoencoder(str(folder), "vq", quantize=True)
    src = open_source("fashion-mnist", "train", image_size=32)
    cpu, wall = time.process_time(), time.perf_counter()
    extract_latents(src, ae, out, batch_size=256)
    return {"images": len(src), "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall}


def trainer(folder: Path, run_dir: Path, latents: Path | None, batch: int) -> Any:
    from condnoise.training.config import load_config
    from condnoise.training.trainer import Trainer

    overrides = [
        "model.size=T/2", f"model.autoencoder={{kind: vq, path: {folder}, quantize: true}}",
        "model.latent_shape=[3, 8, 8]", f"train.batch_size={batch}", "train.threads=1",
        "train.sample_every=0", "run.progress=false", "run.tensorboard=false",
    ]  # fmt: skip
    if latents is not None:
        overrides.append(f"data.latents={latents}")
    cfg = load_config("fmnist-dit-s", overrides)
    return Trainer(cfg, run_dir=run_dir, sample_hook=None)


def time_arm(t: Any, steps: int, warmup: int) -> dict[str, float]:
    """CPU- and wall-seconds of ``steps`` optimizer steps after ``warmup`` untimed ones."""
    from condnoise.training.data import Position

    b = t.cfg.train.batch_size
    stream = t.data.micro_batches(Position(), b, 1, 1, 0)
    for _ in range(warmup):
        t.train_step(stream)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        t.train_step(stream)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "img_per_cpu_s": steps * b / cpu,
            "img_per_wall_s": steps * b / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--autoencoder", default=None, help="VQ folder or autoencoder run directory")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per arm")
    p.add_argument("--batch", type=int, default=128, help="global batch (the preset's)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = autoencoder_folder(args.autoencoder, tmp)
        extraction = extract(folder, tmp / "cache")
        arms = {"on-the-fly": None, "cache": tmp / "cache"}
        trainers = {name: trainer(folder, tmp / name, lat, args.batch) for name, lat in arms.items()}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, t in trainers.items():
                runs[name].append(time_arm(t, args.steps, args.warmup))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = median["cache"]["img_per_cpu_s"] / median["on-the-fly"]["img_per_cpu_s"]
    saved_per_img = 1 / median["on-the-fly"]["img_per_cpu_s"] - 1 / median["cache"]["img_per_cpu_s"]
    result = {
        "model": "fmnist-dit-s with model.size=T/2 on 8x8x3 latents", "batch": args.batch,
        "autoencoder": str(args.autoencoder or "random fmnist-vq-f4 architecture"),
        "threads": 1, "steps": args.steps, "repeats": args.repeats, "extraction": extraction,
        "arms": median, "runs": runs, "speedup_cpu": ratio,
        "break_even_images": extraction["cpu_s"] / saved_per_img if saved_per_img > 0 else None,
    }
    print("| arm | img/s per CPU-second | (wall img/s, shared machine) |\n|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m['img_per_cpu_s']:.1f} | {m['img_per_wall_s']:.1f} |")
    print(f"\ncache / on-the-fly: {ratio:.2f}x per CPU-second; extraction of "
          f"{extraction['images']} images: {extraction['cpu_s']:.1f} CPU-s "
          f"(pays off after {result['break_even_images'] or float('nan'):.0f} training images)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
