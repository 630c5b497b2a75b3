"""``condnoise autoencoder train`` and ``condnoise autoencoder eval``: the latent-diffusion first stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from condnoise.app.common import (
    IntermixedParser,
    add_device_option,
    add_group_parser,
    add_parser,
    add_progress_option,
    flag_overrides,
    positive_int,
    seed_int,
    show_progress,
)
from condnoise.errors import UserError

TRAIN_EPILOG = """\
examples:
  condnoise autoencoder train fmnist-vq-f4 --run-dir runs/ae-fmnist     # ~10 min on 2 CPU cores
  condnoise autoencoder train fmnist-vq-f4 --max-steps 5 --run-dir /tmp/ae-quick   # quick check
  condnoise autoencoder train fmnist-vq-f4 --run-dir runs/ae-fmnist --resume      # after a kill
  condnoise autoencoder train scenes-kl-f8 --source imagefolder:/data/pics loss.kl_weight=1e-6
  condnoise autoencoder train in1k-vq-f4 --source wds:/data/in1k/train-{0000..1023}.tar --device cuda

The diffusers folder is RUN/autoencoder (VQModel / AutoencoderKL.from_pretrained(RUN/autoencoder));
use it in a diffusion config as model.autoencoder={kind: vq, path: RUN/autoencoder}.
key=value overrides use dotted config keys (sections data, model, loss, train, run; values parsed
as YAML), e.g. model.codebook_size=1024 loss.disc_start=500 train.lr=2e-4.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _, sub = add_group_parser(subparsers, "autoencoder", "ACTION",
                              help="train / evaluate VQ and KL autoencoders for latent diffusion")
    _register_train(sub)
    _register_eval(sub)


def _register_train(sub: argparse._SubParsersAction) -> None:
    t = add_parser(
        sub, "train", epilog=TRAIN_EPILOG,
        help="train a VQ-f4 / KL-f8 style autoencoder (resumable)",
        description="Train a diffusers VQModel or AutoencoderKL with the LDM first-stage losses "
                    "(L1, perceptual, PatchGAN with adaptive weight, VQ / KL term); writes a run "
                    "directory with checkpoints, metrics.jsonl, reconstruction grids and the "
                    "diffusers folder RUN/autoencoder.")
    t.__class__ = IntermixedParser
    t.add_argument("config", metavar="PRESET_OR_YAML", nargs="?",
                   help="preset (fmnist-vq-f4, scenes-vq-f4, scenes-kl-f8, in1k-vq-f4) or YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. model.codebook_size=1024 loss.disc_start=500")
    t.add_argument("--run-dir", default=None, help="run directory; None: runs/ae-<preset>-s<seed>")
    t.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this step and save (train.steps, the schedule's length, is "
                        "kept, so --resume continues); None: train to train.steps")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint")
    t.add_argument("--kind", default=None, help="vq (VQModel) or kl (AutoencoderKL); None: model.kind")
    t.add_argument("--downsample", type=positive_int, default=None,
                   help="spatial downsampling factor 4 or 8; None: model.downsample")
    t.add_argument("--source", default=None,
                   help="data source spec (fashion-mnist, digits, imagefolder:PATH, wds:PATTERN, "
                        "...); None: data.source")
    t.add_argument("--seed", type=seed_int, default=None, help="seed; None: train.seed")
    add_device_option(t, "torch device; None: cuda when available, else cpu")
    add_progress_option(t)
    t.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    t.set_defaults(func=run_train)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    e = add_parser(
        sub, "eval", help="PSNR, SSIM, rFID and codebook usage on a split",
        description="Reconstruct a data split with an autoencoder (VQ: quantised; KL: posterior "
                    "mean) and write OUT/metrics.json (psnr, ssim, rfid per extractor, code usage), "
                    "OUT/reconstructions.png and, for VQ models, OUT/code_usage.png.")
    e.add_argument("path", metavar="RUN_OR_FOLDER",
                   help="autoencoder run directory (uses RUN/autoencoder) or diffusers folder")
    e.add_argument("--source", default="fashion-mnist", help="data source spec")
    e.add_argument("--split", default="test", help="data split")
    e.add_argument("--features", default="fmnist-classifier",
                   help="comma-separated extractors for rFID (fmnist-classifier, inception, ...), "
                        "or none")
    e.add_argument("--out", default=None, help="output folder; None: <folder's parent>/eval-<split>")
    e.add_argument("--kind", default="auto", help="auto (from config.json), vq or kl (checked)")
    e.add_argument("--image-size", type=positive_int, default=None,
                   help="image size of the data; None: the autoencoder's sample_size")
    e.add_argument("--max-samples", type=positive_int, default=None, help="use only the first N images; None: all")
    e.add_argument("--crop", type=positive_int, default=None,
                   help="also report PSNR / SSIM on the central NxN pixels (28: Fashion-MNIST "
                        "padded to 32); None: whole images only")
    e.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    e.add_argument("--data-dir", default=None, help="Fashion-MNIST folder; None: the installed dataset")
    add_device_option(e, "torch device; None: cpu")
    e.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads; None: as torch chooses")
    add_progress_option(e)
    e.set_defaults(func=run_eval)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """Positional overrides, then the flag shortcuts (flags win)."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"bad override {bad[0]!r}: expected section.key=value, e.g. train.lr=2e-4")
    out = list(args.overrides)
    out += flag_overrides(args, (("kind", "model.kind"), ("downsample", "model.downsample"),
                                 ("seed", "train.seed")))  # fmt: skip
    return out


def run_train(args: argparse.Namespace) -> int:
    from condnoise.training.autoencoder_config import (
        list_autoencoder_presets,
        load_autoencoder_config,
    )

    presets = list_autoencoder_presets()
    if args.list_presets:
        print("\n".join(presets))
        return 0
    if not args.config:
        raise UserError("autoencoder train: name a preset or YAML file (presets: " + ", ".join(presets) + ")")
    cfg = load_autoencoder_config(args.config, train_overrides(args))
    if args.source is not None:  # set verbatim (a spec is not YAML)
        cfg.data.source = args.source
    if args.run_dir is not None:
        cfg.run.dir = args.run_dir
    cfg.run.progress = cfg.run.progress and show_progress(args)
    from condnoise.evaluation.classifier import perceptual_network
    from condnoise.training.autoencoder import train_autoencoder

    bar, progress = _train_bar(cfg, args.max_steps)
    try:
        result = train_autoencoder(cfg, resume=args.resume, device=args.device,
                                   max_steps=args.max_steps, progress=progress,
                                   classifier=perceptual_network(cfg.loss))
    finally:
        if bar is not None:
            bar.close()
    last = result.last
    summary = f"PSNR {last['psnr']:.2f} dB (last batch)" if "psnr" in last else "nothing to train"
    if "usage" in last:
        summary += f", {last['usage']:.0%} of the codes in the batch, perplexity {last['perplexity']:.0f}"
    print(f"trained to step {result.step} ({result.cpu_seconds:.0f} CPU-s); {summary}\n"
          f"diffusers folder: {result.folder}")
    return 0


def _train_bar(cfg, max_steps):  # type: ignore[no-untyped-def]
    if not cfg.run.progress:
        return None, None
    from tqdm.auto import tqdm

    total = min(cfg.train.steps, max_steps) if max_steps else cfg.train.steps
    bar = tqdm(total=total, desc="autoencoder", unit="step", dynamic_ncols=True)

    def update(record: dict) -> None:
        bar.update(record["step"] - bar.n)
        bar.set_postfix(psnr=f"{record['psnr']:.2f}", refresh=False)

    return bar, update


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from condnoise.models.first_stage import resolve_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    features = tuple(f.strip() for f in args.features.split(",") if f.strip() and f.strip() != "none")
    out = Path(args.out) if args.out else resolve_folder(args.path).parent / f"eval-{args.split}"
    r = evaluate_autoencoder(args, features, out)
    parts = [f"PSNR {r['psnr']:.2f} dB", f"SSIM {r['ssim']:.4f}"]
    if args.crop:
        parts.append(f"PSNR {r[f'psnr_crop{args.crop}']:.2f} dB on the central {args.crop}x{args.crop}")
    parts += [f"rFID@{k} {v:.3f}" for k, v in r.get("rfid", {}).items()]
    if "code_usage" in r:
        parts.append(f"codes used {r['code_usage']:.1%} of {len(r['code_counts'])} "
                     f"(perplexity {r['code_perplexity']:.1f})")
    print(f"{r['data']} ({r['num_images']} images): " + ", ".join(parts) + f"\nwrote {out}/metrics.json")
    return 0


def evaluate_autoencoder(args: argparse.Namespace, features: tuple[str, ...], out: Path) -> dict:
    """Reconstruct ``--source:--split`` deterministically (training.image_stream), measure it
    (evaluation.reconstruction), write reconstructions.png and provenance.json."""
    from tqdm.auto import tqdm

    from condnoise.data.sources import open_source
    from condnoise.evaluation.reconstruction import evaluate_reconstructions
    from condnoise.locks import folder_lock
    from condnoise.models.first_stage import load_first_stage
    from condnoise.provenance import write_provenance
    from condnoise.training.image_stream import (
        ImageBatches,
        reconstructions,
        save_reconstruction_grid,
    )

    device = args.device or "cpu"
    model, kind, folder = load_first_stage(args.path, args.kind, device)
    size = args.image_size or int(model.config.sample_size)
    src = open_source(args.source, args.split, data_dir=args.data_dir, image_size=size)
    data_name = f"{src.meta.name}:{args.split}"
    if src.meta.image_shape[0] != model.config.in_channels:
        raise UserError(f"{data_name} has {src.meta.image_shape[0]} channels but the autoencoder "
                        f"in {folder} takes {model.config.in_channels}")
    images = ImageBatches(src, 0, max_samples=args.max_samples)
    info = {"autoencoder": str(folder), "kind": kind, "data": data_name,
            "image_shape": list(src.meta.image_shape)}
    with folder_lock(out, "autoencoder eval"), \
            tqdm(desc="reconstruct", unit="img", leave=False, disable=not show_progress(args)) as bar:
        r = evaluate_reconstructions(
            reconstructions(model, images, args.batch_size, device), out_dir=out,
            features=features, crop=args.crop, info=info, progress=bar,
            codebook_size=int(model.config.num_vq_embeddings) if kind == "vq" else None)
        save_reconstruction_grid(model, images, out / "reconstructions.png", 16, device)
        write_provenance(out, {"autoencoder": str(folder), "source": args.source, "split": args.split,
                               "features": list(features), "image_size": size,
                               "max_samples": args.max_samples, "crop": args.crop}, None)
    return r
