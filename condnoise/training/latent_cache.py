"""Pre-extracted latents: encode a whole dataset once (fast-DiT style) instead of every step.

``extract_latents(source, autoencoder, out_dir)`` writes::

    OUT/spec.json                       what the cache is made of (checked on resume / read)
    OUT/conditions.npy                  int64 [N] class labels (or conditions.json: captions)
    OUT/shards/latents_00000.npy ...    float32 [n, C, h, w], ``autoencoder.encode(x)``
    OUT/shards/flipped_00000.npy ...    the same for horizontally flipped images (``flips``)
    OUT/index.json                      spec + shard table; written last (the cache is complete)

Shards are ``.npy`` files (read with ``np.load(mmap_mode="r")``, memory-mapped), written
under a temporary name and renamed, so a killed extraction resumes by skipping the shards
that exist. With ``world_size`` > 1, rank ``r`` makes the shards ``k % world_size == r``
(DDP split); the index is written by whichever rank finds every shard present. The
fingerprint (SHA-256 of the autoencoder's kind, scaling factor and weights) and the image
size in the spec let a reader refuse a cache made with another autoencoder or image size.
Latents are deterministic: posterior mean (KL), pre-quantisation latents (VQ) or, with
``quantize``, the codebook vectors, as ``DiffusersAutoencoder.encode`` returns them (scaled
by ``scaling_factor``). The trainer reads a cache with ``data.latents=DIR``
(:meth:`LatentCache.gather` per batch) instead of encoding every step; with quantised VQ
latents this is bitwise the run that encodes on the fly (the nearest code does not depend on
the batch an image is encoded in; a posterior mean can differ in the last bits).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condnoise.errors import UserError
from condnoise.io import atomic_path, write_json

SCHEMA = "condnoise.latents/1"


def autoencoder_fingerprint(autoencoder: Any) -> str:
    """16 hex digits identifying an autoencoder's kind, scaling factor and weights."""
    head = {"kind": autoencoder.kind, "scale": float(autoencoder.scale)}
    if getattr(autoencoder, "quantize", False):  # quantised latents are other latents
        head["quantize"] = True
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, t in sorted(autoencoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_spec(source: Any, autoencoder: Any, *, shard_size: int, flips: bool) -> dict[str, Any]:
    meta = source.meta
    image_shape = list(meta.image_shape)
    return {
        "schema": SCHEMA, "source": meta.name, "split": meta.split, "num_samples": len(source),
        "image_shape": image_shape,
        "latent_shape": list(autoencoder.latent_shape(tuple(image_shape))),
        "autoencoder": {"kind": autoencoder.kind, "path": str(autoencoder.path),
                        "scaling_factor": float(autoencoder.scale),
                        "quantize": bool(getattr(autoencoder, "quantize", False)),
                        "fingerprint": autoencoder_fingerprint(autoencoder)},
        "shard_size": shard_size, "flips": flips, "dtype": "float32",
        "condition_kind": meta.condition_kind, "class_names": list(meta.class_names),
    }  # fmt: skip


def shard_path(out_dir: Path, k: int, flipped: bool = False) -> Path:
    return Path(out_dir) / "shards" / f"{'flipped' if flipped else 'latents'}_{k:05d}.npy"


def _check_spec(out_dir: Path, spec: dict[str, Any]) -> None:
    path = out_dir / "spec.json"
    if not path.is_file():
        write_json(path, spec)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = [k for k in spec if k != "autoencoder" and old.get(k) != spec[k]]
    if (old.get("autoencoder") or {}).get("fingerprint") != spec["autoencoder"]["fingerprint"]:
        diff.append("autoencoder")  # the same weights may have moved: the path is not compared
    if diff:
        raise UserError(f"latent cache {out_dir} was made with other settings ({', '.join(diff)}); "
                        "use a new output folder")


def _images(source: Any, start: int, stop: int, num_workers: int) -> torch.Tensor:
    if hasattr(source, "tensors"):
        return source.tensors()[0][start:stop]
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(source, range(start, stop)), batch_size=stop - start,
                        num_workers=num_workers, collate_fn=lambda items: [x for x, _ in items])
    return torch.stack(next(iter(loader)))


@torch.no_grad()
def _encode(autoencoder: Any, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    out = [autoencoder.encode(images[s:s + batch_size].to(device)).float().cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def _write_shard(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, np.float32))


def extract_latents(source: Any, autoencoder: Any, out_dir: str | Path, *, flips: bool = False,
                    shard_size: int = 4096, batch_size: int = 64, rank: int = 0,
                    world_size: int = 1, num_workers: int = 0, device: str | None = None,
                    progress: Any = None) -> Path | None:
    """Encode ``source`` (a map-style ``ConditionalDataset``) into ``out_dir``; resumable.

    Returns the index path once every shard exists, else ``None`` (other ranks pending).
    """
    from torch.utils.data import IterableDataset

    if isinstance(source, IterableDataset):
        raise UserError(f"latent extraction needs an indexable source; {source.meta.name!r} is "
                        "streamed (convert it to an image folder first)")
    if shard_size < 1 or batch_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad extraction settings: shard_size={shard_size}, batch_size={batch_size}, "
                        f"rank={rank}, world_size={world_size}")
    out = Path(out_dir)
    spec = cache_spec(source, autoencoder, shard_size=shard_size, flips=flips)
    _check_spec(out, spec)
    if rank == 0:
        _write_conditions(out, source)
    dev = torch.device(device) if device else next(autoencoder.parameters()).device
    n = spec["num_samples"]
    num_shards = -(-n // shard_size)
    for k in range(rank, num_shards, world_size):
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        if shard_path(out, k).is_file() and (not flips or shard_path(out, k, True).is_file()):
            continue
        images = _images(source, start, stop, num_workers)
        if flips:
            _write_shard(shard_path(out, k, True), _encode(autoencoder, images.flip(-1), batch_size, dev))
        _write_shard(shard_path(out, k), _encode(autoencoder, images, batch_size, dev))
        if progress is not None:
            progress.update(stop - start)
    return write_index(out, spec, num_shards)


def _write_conditions(out: Path, source: Any) -> None:
    conds = source.conditions()
    if source.meta.condition_kind == "class":
        with atomic_path(out / "conditions.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(conds, np.int64))
    else:
        write_json(out / "conditions.json", list(conds))


def write_index(out: Path, spec: dict[str, Any], num_shards: int) -> Path | None:
    """``index.json`` when every shard is present (``None`` otherwise)."""
    names = [shard_path(out, k) for k in range(num_shards)]
    if spec["flips"]:
        names += [shard_path(out, k, True) for k in range(num_shards)]
    if not all(p.is_file() for p in names):
        return None
    shards = [{"file": f"shards/{shard_path(out, k).name}",
               "start": k * spec["shard_size"],
               "count": min(spec["num_samples"], (k + 1) * spec["shard_size"]) - k * spec["shard_size"]}
              for k in range(num_shards)]  # fmt: skip
    write_json(out / "index.json", {**spec, "num_shards": num_shards, "shards": shards})
    return out / "index.json"


class LatentCache:
    """A complete cache (``index.json``): memory-mapped shards and the conditions."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        path = self.root / "index.json"
        if not path.is_file():
            raise UserError(f"{out_dir} is not a complete latent cache (no index.json); run the "
                            "extraction (again) to finish it")
        self.index = json.loads(path.read_text(encoding="utf-8"))
        if self.index.get("schema") != SCHEMA:
            raise UserError(f"{path}: unknown schema {self.index.get('schema')!r}")
        self._maps: dict[tuple[int, bool], np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])  # type: ignore[return-value]

    def check(self, *, fingerprint: str | None = None, image_size: int | None = None,
              source: str | None = None) -> None:
        """UserError when the cache was made with another autoencoder / image size / source."""
        made = self.index["autoencoder"]
        if fingerprint is not None and made["fingerprint"] != fingerprint:
            raise UserError(f"latent cache {self.root} was made with another autoencoder "
                            f"(fingerprint {made['fingerprint']}, {made['path']}), the run's is "
                            f"{fingerprint}; extract the latents again")
        size = self.index["image_shape"][-1]
        if image_size is not None and size != image_size:
            raise UserError(f"latent cache {self.root} holds {size}px images' latents, the run "
                            f"uses data.image_size={image_size}")
        if source is not None and self.index["source"] != source:
            raise UserError(f"latent cache {self.root} was made from {self.index['source']}, the "
                            f"run reads {source}")

    def check_data(self, meta: Any, num_samples: int, image_size: int | None) -> None:
        """UserError unless the cache holds the latents of this split (``DatasetMeta``), at
        least its first ``num_samples`` images, at ``image_size``."""
        self.check(image_size=image_size, source=meta.name)
        if self.index["split"] != meta.split:
            raise UserError(f"latent cache {self.root} holds split {self.index['split']!r}, the "
                            f"run reads {meta.split!r} (data.split)")
        if self.num_samples < num_samples:
            raise UserError(f"latent cache {self.root} holds {self.num_samples} latents, the run "
                            f"reads {num_samples} images")

    def gather(self, idx: torch.Tensor, flipped: bool = False) -> torch.Tensor:
        """``float32 [len(idx), C, h, w]``: the latents of dataset indices ``idx`` (any order),
        read from the memory-mapped shards."""
        if flipped and not self.index["flips"]:
            raise UserError(f"latent cache {self.root} holds no flipped latents (extract with flips)")
        i = np.asarray(idx, np.int64)
        size = int(self.index["shard_size"])
        out = np.empty((len(i), *self.latent_shape), np.float32)
        shard = i // size
        for k in np.unique(shard):
            rows = shard == k
            key = (int(k), flipped)
            if key not in self._maps:
                self._maps[key] = self.shard(int(k), flipped)
            out[rows] = self._maps[key][i[rows] - int(k) * size]
        return torch.from_numpy(out)

    def shard(self, k: int, flipped: bool = False) -> np.ndarray:
        """Shard ``k`` as a read-only memory map ``float32 [n, C, h, w]``."""
        return np.load(shard_path(self.root, k, flipped), mmap_mode="r")

    def latents(self, flipped: bool = False) -> np.ndarray:
        """All latents ``float32 [N, C, h, w]`` (shards concatenated into memory)."""
        if flipped and not self.index["flips"]:
            raise UserError(f"latent cache {self.root} holds no flipped latents (extract with flips)")
        return np.concatenate([self.shard(k, flipped) for k in range(self.index["num_shards"])])

    def conditions(self) -> Any:
        if (self.root / "conditions.npy").is_file():
            return np.load(self.root / "conditions.npy")
        return json.loads((self.root / "conditions.json").read_text(encoding="utf-8"))
