"""``condnoise latents extract``: encode a dataset once into a latent cache (fast-DiT style)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from condnoise.app.common import (
    add_device_option,
    add_group_parser,
    add_parser,
    add_progress_option,
    float_range,
    nonneg_int,
    positive_int,
    show_progress,
)

EPILOG = """\
examples:
  condnoise latents extract fashion-mnist --autoencoder runs/ae-fmnist-vq-f4-s0 --quantize \\
      --out cache/fmnist-vq-f4
  torchrun --nproc-per-node 8 -m condnoise latents extract imagefolder:/data/in1k/train \\
      --image-size 256 --autoencoder sd-vae --flips --out /data/in1k-sdvae   # shard k on rank k % 8

Train on it with data.latents=DIR (and the same model.autoencoder: kind, path, scaling_factor,
quantize): the trainer reads the latents instead of encoding every batch. A killed extraction
resumes (existing shards are kept); the cache is complete once DIR/index.json exists.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _, sub = add_group_parser(subparsers, "latents", "ACTION",
                              help="pre-extract autoencoder latents of a dataset")
    e = add_parser(
        sub, "extract", epilog=EPILOG,
        help="encode a whole split into memory-mapped latent shards (resumable, split over ranks)",
        description="Encode every image of SOURCE:SPLIT with a frozen autoencoder (KL: posterior "
                    "mean; VQ: pre-quantisation latents, or codebook vectors with --quantize), "
                    "scaled by its scaling_factor, into DIR/shards/*.npy with DIR/index.json "
                    "(source, split, image size, latent shape, autoencoder fingerprint).")
    e.add_argument("source", metavar="SOURCE",
                   help="data source spec (fashion-mnist, digits, scenes, imagefolder:PATH, ...)")
    e.add_argument("--autoencoder", required=True, metavar="PATH",
                   help="diffusers autoencoder folder, or an autoencoder run directory "
                        "(uses RUN/autoencoder)")
    e.add_argument("--out", required=True, metavar="DIR", help="cache folder")
    e.add_argument("--split", default="train", help="data split")
    e.add_argument("--image-size", type=nonneg_int, default=32,
                   help="image size the source is resized to (the run's data.image_size); "
                        "0: the source's native size")
    e.add_argument("--data-dir", default=None, help="Fashion-MNIST folder; None: the installed dataset")
    e.add_argument("--kind", default="auto", help="auto (from config.json), vq or kl (checked)")
    e.add_argument("--scaling-factor", type=float_range(0, lo_open=True), default=None,
                   help="latent scale; None: the folder's scaling_factor")
    e.add_argument("--quantize", action="store_true",
                   help="VQ: store the nearest codebook vectors (model.autoencoder.quantize)")
    e.add_argument("--flips", action="store_true",
                   help="also store the latents of horizontally flipped images")
    e.add_argument("--shard-size", type=positive_int, default=4096, help="latents per shard file")
    e.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    e.add_argument("--num-workers", type=nonneg_int, default=0, help="DataLoader workers decoding files")
    add_device_option(e, "torch device; None: cuda:<LOCAL_RANK> when available, else cpu")
    e.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads; None: as torch chooses")
    add_progress_option(e)
    e.set_defaults(func=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    import torch

    from condnoise.locks import folder_lock
    from condnoise.training.runtime import barrier, cleanup_distributed, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    # rank 0 holds the folder's lock: another extraction into it stops with one line
    lock = folder_lock(args.out, "latents extract") if info.rank == 0 else contextlib.nullcontext()
    try:
        with lock:
            index = _extract(args, info)
            barrier(info)
            if index is None and info.rank == 0:  # other ranks made the last shards
                index = _extract(args, info)
    finally:
        cleanup_distributed()
    if info.rank == 0:
        print(f"latent cache complete: {index}" if index else f"{args.out}: shards pending")
    return 0


def _extract(args: argparse.Namespace, info) -> Path | None:  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    from condnoise.data.sources import open_source
    from condnoise.models.autoencoder import DiffusersAutoencoder
    from condnoise.models.first_stage import folder_kind, resolve_folder
    from condnoise.provenance import write_provenance
    from condnoise.training.latent_cache import extract_latents

    folder = resolve_folder(args.autoencoder)
    kind = folder_kind(folder) if args.kind == "auto" else args.kind
    ae = DiffusersAutoencoder(str(folder), kind, args.scaling_factor, quantize=args.quantize)
    ae.to(info.device)
    src = open_source(args.source, args.split, data_dir=args.data_dir,
                      image_size=args.image_size or None)
    bar = tqdm(total=len(src), desc=f"latents (rank {info.rank})", unit="img",
               disable=not show_progress(args), leave=False)
    with bar:
        index = extract_latents(src, ae, args.out, flips=args.flips, shard_size=args.shard_size,
                                batch_size=args.batch_size, rank=info.rank,
                                world_size=info.world_size, num_workers=args.num_workers,
                                device=str(info.device), progress=bar)
    if info.rank == 0:
        write_provenance(args.out, {k: v for k, v in vars(args).items() if k != "func"}, None)
    return index
