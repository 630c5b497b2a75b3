"""Evaluate sample folders against a reference data set (paper §5) -> ``metrics.json``.

A sample folder holds ``samples.npz`` (``images`` uint8 [N,H,W,C], ``labels`` int64 [N],
the requested classes) and ``meta.json`` as written by ``condnoise sample``; a text model's
folder names its prompts instead (``captions`` or ``source_split`` + ``source_indices``,
see ``prompts``; ``labels`` then optional). Reference
features are cached per (data, split, size limit, extractor fingerprint) as ``.npz``
(``mu, sigma, features, labels`` and ``probs`` for classifiers) under
``$CONDNOISE_CACHE/features/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condnoise import stats
from condnoise.errors import UserError
from condnoise.evaluation import metrics as M
from condnoise.evaluation.classifier import cache_dir
from condnoise.evaluation.features import (
    Extractor,
    available_extractors,
    check_images,
    fit_resolution,
    get_extractor,
    round_trip,
)
from condnoise.evaluation.records import samples_hash, value_settings
from condnoise.io import atomic_path, read_json, read_npz

SCHEMA = "condnoise.metrics/1"
# metric option -> needs ("features": per extractor, "probs": classifier, "spatial": sFID net,
# "text": an extractor with a text tower, "captions": the scenes-recognizer, no extractor)
METRICS = {
    "fid": "features", "pr": "features", "dc": "features", "top-pr": "features",
    "rmd": "features", "knn-l2": "train", "memorization": "train",
    "sfid": "spatial", "is": "probs", "condition-accuracy": "probs",
    "clip-score": "text", "r-precision": "text", "caption-accuracy": "captions",
    "entropy": "latents",  # VQ runs only: sample entropy and code usage (entropy.py)
    "edge-f1": "controls", "mask-iou": "controls",  # --controls-from samples (control_metrics.py)
}
LABEL_METRICS = ("condition-accuracy", "rmd")  # need the requested class of each sample
PROMPT_METRICS = ("clip-score", "r-precision", "caption-accuracy")
DEFAULT_METRICS = ("fid", "pr", "dc", "is", "condition-accuracy", "rmd")


@dataclass
class Samples:
    folder: Path
    images: np.ndarray
    labels: np.ndarray  # requested classes; -1 where the folder has none (text models)
    meta: dict = field(default_factory=dict)
    prompts: list[str] | None = None  # one per sample (text models), see ``prompts``
    has_labels: bool = True
    latents: np.ndarray | None = None  # sampler output [N, C, h, w] (scaled), when saved
    controls: np.ndarray | None = None  # native spatial controls uint8 [N, H, W] (--controls-from)


def find_sample_folders(path: str | Path) -> list[Path]:
    """``path`` itself if it holds samples.npz, else its sub-folders that do (s{scale}/)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"sample folder {p} does not exist")
    if (p / "samples.npz").is_file():
        return [p]
    found = sorted(q.parent for q in p.glob("*/samples.npz"))
    if not found:
        if p.is_dir() and (p / "checkpoints").is_dir():
            raise UserError(f"{p} is a training run, not a sample folder; run `condnoise sample` "
                            "on it first and evaluate the folder it writes")
        raise UserError(f"{p}: no samples.npz in it or in its sub-folders (written by "
                        "`condnoise sample`)")
    return found


PROMPT_KEYS = ("captions", "source_split", "source_indices", "source_data")


def load_samples(folder: Path, *, default_data: str = "scenes") -> Samples:
    """A sample folder; ``default_data``: the source of ``source_split`` when meta.json
    names no ``source_data`` (the evaluate command passes the data of ``--ref``)."""
    from condnoise.evaluation.prompts import per_sample, prompt_list

    path = folder / "samples.npz"
    z = read_npz(path, ("images",))  # one line for a missing, empty or truncated file
    images, labels = z["images"], z.get("labels")
    extra = {k: z[k] for k in PROMPT_KEYS if k in z}
    latents = z.get("latents")  # the sampler output, when saved
    controls = z.get("controls")  # each sample's spatial control, when sampled with controls
    if images.ndim == 3:
        images = images[..., None]
    check_images(images, str(path))
    meta_path = folder / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    prompts = prompt_list(folder, meta, extra, default_data)
    if labels is None and prompts is None:
        raise UserError(f"{path}: missing array(s) ['labels'] (or the prompts of a text model: "
                        "captions, or source_split + source_indices)")
    if labels is not None and labels.shape != (len(images),):
        if prompts is None:
            raise UserError(f"{path}: {len(images)} images but labels of shape {labels.shape}")
        labels = None
    if labels is not None and prompts is None and not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {labels.dtype}")
    if prompts is not None:
        prompts = per_sample(folder, prompts, labels, len(images))
    if labels is None:
        labels = np.full(len(images), -1, np.int64)
    # a text model's labels (if any) index its prompts: never class labels
    return Samples(folder, images, labels.astype(np.int64), meta, prompts,
                   has_labels=prompts is None, latents=latents, controls=controls)  # fmt: skip


def parse_ref(spec: str) -> tuple[str, str]:
    """``DATA[:split]`` -> (data, split); split defaults to ``test``."""
    data, _, split = spec.partition(":")
    if data in ("imagefolder", "captions", "wds") or split.startswith("seed="):
        # these specs carry a path or an option after ':' (scenes:seed=1:test)
        data, _, split = spec.rpartition(":") if spec.count(":") > 1 else (spec, "", "")
    if not data:
        raise UserError(f"--ref {spec!r}: expected DATA[:split], e.g. fashion-mnist:test")
    return data, split or "test"


def load_reference(spec: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference images uint8 [N,H,W,C] and labels; first ``limit`` items if given."""
    data, split = parse_ref(spec)
    if data == "fashion-mnist":
        from condnoise.data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist(split)
        images = images[..., None]
    else:
        import torch

        from condnoise.data.sources import open_source

        ds = open_source(data, split)
        if hasattr(ds, "images_uint8"):  # scenes: the renders themselves, caption indices
            images, labels = ds.images_uint8(), np.arange(len(ds))
        elif not hasattr(ds, "tensors"):
            raise UserError(f"--ref {spec}: only in-memory class-labelled sources are supported")
        else:
            x, y = ds.tensors()
            images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images, labels = images.permute(0, 2, 3, 1).numpy(), y.numpy()
    if limit is not None:
        if limit < 1:
            raise UserError(f"reference size limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return np.ascontiguousarray(images), np.asarray(labels, np.int64)


def reference_features(extractor: Extractor, spec: str, limit: int | None = None,
                       *, with_probs: bool = False, resolution: int | None = None
                       ) -> dict[str, np.ndarray]:  # fmt: skip
    """Features of the reference set, cached as ``.npz`` (mu, sigma, features, labels[, probs]).

    ``resolution``: pass the images through a model of that size's pipeline first
    (:func:`~condnoise.evaluation.features.round_trip`); None keeps them as they are."""
    path = _feature_cache_path(extractor, spec, limit, resolution=resolution)
    if path.is_file():
        try:
            cached = read_npz(path, ("features", "labels", "mu", "sigma"))
        except UserError:  # a damaged cache entry (killed mid-write by an older version)
            cached = {}
        if cached and (not with_probs or "probs" in cached):
            return cached
    images, labels = load_reference(spec, limit)
    if resolution:
        images = round_trip(images, resolution)
    feats = extractor.extract(images)
    out = {"features": feats, "labels": labels, "mu": feats.mean(0, dtype=np.float64),
           "sigma": np.cov(feats.astype(np.float64), rowvar=False)}
    if hasattr(extractor, "probs"):
        out["probs"] = extractor.probs(images)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return out


def reference_captions(spec: str, limit: int | None = None) -> list[str]:
    """The captions of a captioned reference split (the R-precision distractor pool)."""
    data, split = parse_ref(spec)
    from condnoise.data.sources import open_source

    conds = open_source(data, split).conditions()
    if not len(conds) or not isinstance(conds[0], str):
        raise UserError(f"--ref {spec} has no captions; r-precision draws its distractor "
                        "captions from the reference (e.g. --ref scenes:test)")
    return list(conds[:limit] if limit else conds)


def reference_text_features(extractor, spec: str, limit: int | None = None) -> np.ndarray:
    """Text-tower embeddings of the reference captions, cached like :func:`reference_features`."""
    path = _feature_cache_path(extractor, spec, limit, "captions-")
    if path.is_file():
        with np.load(path) as z:
            return z["text"]
    text = extractor.encode_text(reference_captions(spec, limit))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, text=text)
    return text


def _feature_cache_path(extractor: Extractor, spec: str, limit: int | None, kind: str = "",
                        resolution: int | None = None) -> Path:  # fmt: skip
    data, split = parse_ref(spec)
    safe = _safe(f"{data}-{split}")
    res = f"-r{resolution}" if resolution else ""
    return cache_dir() / "features" / (
        f"{safe}-n{limit or 'all'}{res}-{kind}{_safe(extractor.name)}-{extractor.fingerprint()}.npz")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def reference_size(spec: str) -> int:
    images, _ = load_reference(spec, 1)
    return images.shape[1]


@dataclass
class EvalConfig:
    ref: str = "fashion-mnist:test"
    train_ref: str | None = None
    extractors: tuple[str, ...] = ("fmnist-classifier",)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    k: int = 3
    dc_k: int = 5
    shrinkage: float = 0.0
    max_ref: int | None = None
    max_train: int | None = None
    memorization_threshold: float | None = None
    memorization_percentile: float = 1.0
    top_pr_seed: int = 0
    is_splits: int = 10
    entropy_tau: float = 1.0  # softmax temperature of the sample entropy
    entropy_pool: int = 32768  # latent vectors in the code-usage histogram
    edge_tolerance: int = 1  # edge F1: pixels (Chebyshev) an edge may be off


#: EvalConfig fields with a natural range: (low, high, what)
_RANGES = {
    "k": (1, None, "--k"), "dc_k": (1, None, "--dc-k"), "shrinkage": (0.0, 1.0, "--shrinkage"),
    "max_ref": (1, None, "--max-ref"), "max_train": (1, None, "--max-train"),
    "memorization_threshold": (0.0, None, "--memorization-threshold"),
    "memorization_percentile": (0.0, 100.0, "--memorization-percentile"),
    "top_pr_seed": (0, None, "--seed"), "is_splits": (1, None, "is_splits"),
    "entropy_tau": (1e-12, None, "--entropy-tau"), "entropy_pool": (1, None, "--entropy-pool"),
    "edge_tolerance": (0, 8, "--edge-tolerance"),
}  # fmt: skip


def validate_config(cfg: EvalConfig) -> None:
    """Every setting of ``cfg`` (ranges, metric and extractor names), checked without
    building an extractor or reading any data; UserError naming the first bad one."""
    import math

    for key, (lo, hi, flag) in _RANGES.items():
        value = getattr(cfg, key)
        if value is None and key in ("max_ref", "max_train", "memorization_threshold"):
            continue
        bad = not isinstance(value, int | float) or not math.isfinite(value) \
            or value < lo or (hi is not None and value > hi)  # fmt: skip
        if bad:
            span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UserError(f"{flag} must be {span}, got {value}")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(sorted(METRICS))}")
    names = available_extractors()
    for name in cfg.extractors:
        if name.startswith("clip:"):  # a folder or hub id, checked without loading it
            from condnoise.evaluation.text_features import clip_location

            clip_location(name[len("clip:"):])
        elif name not in names:
            raise UserError(f"unknown feature extractor {name!r}; choose from {', '.join(names)}")


_EXTRACTORS: dict[str, Extractor] = {}


def get_extractor_cached(name: str) -> Extractor:
    if name not in _EXTRACTORS:
        _EXTRACTORS[name] = get_extractor(name)
    return _EXTRACTORS[name]


@dataclass
class EvalResult:
    """What :func:`evaluate_samples` returns: the ``metrics.json`` object and, per extractor,
    the per-sample scores it computed on the way (float arrays [N]): ``rmd`` (relative
    Mahalanobis distance), ``train_l2_nearest`` and ``train_l2_top5`` (mean over the 5
    nearest training features)."""

    record: dict
    per_sample: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def score_arrays(self) -> dict[str, np.ndarray]:
        """The per-sample scores as flat ``{"rmd@fmnist-classifier": float32 [N]}`` arrays."""
        return {f"{score}@{ex}": v.astype(np.float32) for ex, d in self.per_sample.items()
                for score, v in d.items()}  # fmt: skip


class _Collector:
    """Accumulates ``metrics[metric][extractor]``, ``details`` and per-sample scores."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, float]] = {}
        self.details: dict[str, dict] = {}
        self.per_sample: dict[str, dict[str, np.ndarray]] = {}

    def put(self, metric: str, extractor: str, value: float) -> None:
        self.metrics.setdefault(metric, {})[extractor] = float(value)

    def detail(self, key: str, extractor: str, value) -> None:
        self.details.setdefault(key, {})[extractor] = value

    def scores(self, extractor: str, name: str, values: np.ndarray) -> None:
        self.per_sample.setdefault(extractor, {})[name] = np.asarray(values, np.float64)


def evaluate_samples(samples: Samples, cfg: EvalConfig, *, progress: bool = False,
                     autoencoder: Any = None) -> EvalResult:
    """All requested metrics for one sample folder (``record`` = the metrics.json object)
    plus the per-sample scores behind them; ``progress``: bars over feature batches;
    ``autoencoder``: the run's VQ autoencoder, which ``entropy`` needs
    (``training.runtime.load_vq_autoencoder``)."""
    validate_config(cfg)
    _check_conditions(samples, cfg)
    with_features = any(METRICS[m] not in ("captions", "latents", "controls") for m in cfg.metrics)
    spatial = ["inception-spatial"] if "sfid" in cfg.metrics else []
    for name in (*(cfg.extractors if with_features else ()), *spatial):
        get_extractor_cached(name).progress = progress
    ref_size = reference_size(cfg.ref)
    images = fit_resolution(samples.images, ref_size, what=str(samples.folder / "samples.npz"))
    size = samples.images.shape[1]
    resolution = size if size < ref_size else None  # reference through the same pipeline
    train_ref = cfg.train_ref or f"{parse_ref(cfg.ref)[0]}:train"
    _check_extractors(cfg)
    out = _Collector()
    if "entropy" in cfg.metrics:  # first: a KL / pixel run fails before any feature work
        _entropy_metrics(samples, cfg, autoencoder, out)
    if any(METRICS[m] == "controls" for m in cfg.metrics):
        _control_metrics(samples, cfg, out)
    if with_features:
        for name in cfg.extractors:
            _evaluate_extractor(get_extractor_cached(name), images, samples, cfg, train_ref, out,
                                resolution)  # fmt: skip
    if "sfid" in cfg.metrics:
        ex = get_extractor_cached("inception-spatial")
        ref = reference_features(ex, cfg.ref, cfg.max_ref)
        out.put("sfid", ex.name, M.sfid(ref["features"], ex.extract(images), shrinkage=cfg.shrinkage))
    if "caption-accuracy" in cfg.metrics:
        _caption_accuracy(samples, out)
    record = {
        "schema": SCHEMA,
        "samples": str(samples.folder),
        "num_samples": len(images),
        "sample_shape": list(samples.images.shape[1:]),
        "evaluated_shape": list(images.shape[1:]),
        "sample_meta": samples.meta,
        "samples_sha256": samples_hash(samples.images, samples.labels, samples.prompts),
        "settings": value_settings(cfg),
        "reference": {"spec": cfg.ref, "train_spec": train_ref, "max_ref": cfg.max_ref,
                      "resolution": resolution},
        "metrics": out.metrics,
        "details": out.details,
    }
    return EvalResult(record, out.per_sample)


def _check_conditions(samples: Samples, cfg: EvalConfig) -> None:
    """Class metrics need class labels, prompt metrics need prompts, R-precision a captioned
    reference (one line otherwise, before any work)."""
    need_labels = [m for m in cfg.metrics if m in LABEL_METRICS]
    if need_labels and not samples.has_labels:
        raise UserError(f"{samples.folder}: metric(s) {', '.join(need_labels)} need the requested "
                        "class of each sample; this folder holds prompts (drop them from --metrics)")
    need_prompts = [m for m in cfg.metrics if m in PROMPT_METRICS]
    if need_prompts and samples.prompts is None:
        raise UserError(f"{samples.folder}: metric(s) {', '.join(need_prompts)} need the prompts "
                        "the samples were generated from (captions, or source_split + "
                        "source_indices, in samples.npz or meta.json); none found")
    if "r-precision" in cfg.metrics:
        reference_captions(cfg.ref, 1)  # the distractor pool exists (UserError otherwise)


def _control_metrics(samples: Samples, cfg: EvalConfig, out: _Collector) -> None:
    """Edge F1 / mask IoU of the samples against their controls (``control_metrics``), with
    the half-width of their 95% interval (``details``) and per-sample scores."""
    from condnoise.evaluation import control_metrics as C

    settings = samples.meta.get("controls")
    if samples.controls is None or not isinstance(settings, dict):
        raise UserError(f"{samples.folder}: metric(s) edge-f1 / mask-iou need samples made with "
                        "`condnoise sample --controls-from SPLIT` (controls in samples.npz, their "
                        "kind in meta.json)")  # fmt: skip
    for metric in (m for m in cfg.metrics if METRICS[m] == "controls"):
        scores = C.control_scores(metric, samples.images, samples.controls, settings, cfg.edge_tolerance)
        key = metric.replace("-", "_")
        mean, half = C.summarize(scores)
        out.put(key, "controls", mean)
        out.detail(f"{key}_ci95", "controls", half)
        out.scores("controls", key, scores)
    out.detail("controls", "controls", {**settings, "edge_tolerance": cfg.edge_tolerance})


def _check_extractors(cfg: EvalConfig) -> None:
    from condnoise.evaluation.text_features import TextImageExtractor

    probs_wanted = [m for m in cfg.metrics if METRICS[m] == "probs"]
    if probs_wanted and not any(hasattr(get_extractor_cached(n), "probs") for n in cfg.extractors):
        raise UserError(f"metric(s) {', '.join(probs_wanted)} need a classifier extractor "
                        "(--features fmnist-classifier)")
    text_wanted = [m for m in cfg.metrics if METRICS[m] == "text"]
    if text_wanted and not any(isinstance(get_extractor_cached(n), TextImageExtractor)
                               for n in cfg.extractors):  # fmt: skip
        raise UserError(f"metric(s) {', '.join(text_wanted)} need a text-image extractor "
                        "(--features scenes-clip or clip:PATH)")


def _entropy_metrics(samples: Samples, cfg: EvalConfig, autoencoder: Any, out: _Collector) -> None:
    """Sample entropy and code usage over the run's VQ codebook (paper Sec. 5)."""
    from condnoise.evaluation.entropy import entropy_of_samples

    values, info = entropy_of_samples(samples.images, samples.latents, autoencoder,
                                      tau=cfg.entropy_tau, pool=cfg.entropy_pool)
    for key, v in values.items():
        out.put(key, "vq-codebook", v)
    out.detail("entropy", "vq-codebook", info)


def _evaluate_extractor(ex: Extractor, images: np.ndarray, samples: Samples, cfg: EvalConfig,
                        train_ref: str, out: _Collector, resolution: int | None = None) -> None:
    """Every requested metric of one extractor: features once, reference features cached
    (through the samples' resolution pipeline when ``resolution`` is set)."""
    from condnoise.evaluation.text_features import TextImageExtractor

    wants_text = isinstance(ex, TextImageExtractor) and bool({"clip-score", "r-precision"}
                                                            & set(cfg.metrics))  # fmt: skip
    wants_features = any(METRICS[m] in ("features", "train", "probs") for m in cfg.metrics)
    if not (wants_text or wants_features):
        return
    feats = ex.extract(images)
    has_probs = hasattr(ex, "probs")
    needs_probs = has_probs and any(METRICS[m] == "probs" for m in cfg.metrics)
    if wants_features:
        ref = reference_features(ex, cfg.ref, cfg.max_ref, with_probs=needs_probs,
                                 resolution=resolution)  # fmt: skip
        _feature_metrics(ex.name, feats, ref, samples, cfg, out)
        if needs_probs:
            native = ref if resolution is None else reference_features(
                ex, cfg.ref, cfg.max_ref, with_probs=True)  # fmt: skip
            _probability_metrics(ex.name, ex.probs(images), ref, samples.labels, cfg, out, native)
        if {"knn-l2", "memorization"} & set(cfg.metrics):
            train = reference_features(ex, train_ref, cfg.max_train, resolution=resolution)["features"]
            _train_metrics(ex.name, feats, ref["features"], train, cfg, out)
    if wants_text:
        _text_metrics(ex, feats, samples, cfg, out)


def _text_metrics(ex, feats: np.ndarray, samples: Samples, cfg: EvalConfig,
                  out: _Collector) -> None:
    """CLIP score and R-precision of the samples against their prompts (``text_metrics``)."""
    from condnoise.evaluation import text_metrics as T

    assert samples.prompts is not None  # _check_conditions
    text = ex.encode_text(samples.prompts)
    if "clip-score" in cfg.metrics:
        out.put("clip_score", ex.name, T.clip_score(feats, text))
        out.scores(ex.name, "clip_score", T.clip_scores(feats, text))
    if "r-precision" in cfg.metrics:
        pool = reference_captions(cfg.ref, cfg.max_ref)
        idx = T.distractor_indices(samples.prompts, pool, seed=cfg.top_pr_seed)
        pool_text = reference_text_features(ex, cfg.ref, cfg.max_ref)
        out.put("r_precision", ex.name, T.r_precision(feats, text, pool_text, idx))


def _caption_accuracy(samples: Samples, out: _Collector) -> None:
    """The scenes-recognizer's reading of each sample against its prompt's record: every
    attribute over all prompts, and separately over prompts of seen pairs (``_seen``, the
    ``test`` kind) and of held-out pairs (``_novel``, the ``test-novel`` kind)."""
    from condnoise.evaluation import recognizer as R
    from condnoise.evaluation.prompts import novel_mask, prompt_records

    assert samples.prompts is not None  # _check_conditions
    records = prompt_records(samples.folder, samples.prompts)
    model, card = load_recognizer_cached()
    pred, target = R.predict(model, samples.images), R.record_targets(records)
    novel = novel_mask(records)
    for suffix, rows in (("", slice(None)), ("_seen", ~novel), ("_novel", novel)):
        sel = np.arange(len(records))[rows]
        if not len(sel):
            continue
        acc = R.attribute_accuracy({k: v[sel] for k, v in pred.items()},
                                   {k: v[sel] for k, v in target.items()})  # fmt: skip
        for attr, value in acc.items():
            out.put(f"caption_{attr}{suffix}", R.NAME, value)
    out.detail("caption_ceiling", R.NAME, {k: card["accuracy"][k]["all"] for k in card["accuracy"]})
    out.detail("caption_prompts", R.NAME, {"seen": int((~novel).sum()), "novel": int(novel.sum())})


_RECOGNIZERS: dict[str, tuple] = {}


def load_recognizer_cached():
    """The scenes-recognizer of the current cache directory, loaded once per process."""
    from condnoise.evaluation.recognizer import load_recognizer

    key = str(cache_dir())
    if key not in _RECOGNIZERS:
        _RECOGNIZERS[key] = load_recognizer()
    return _RECOGNIZERS[key]


def _feature_metrics(name: str, feats: np.ndarray, ref: dict, samples: Samples,
                     cfg: EvalConfig, out: _Collector) -> None:
    """FID, precision / recall, density / coverage, TopP&R and RMD on one feature space."""
    real = ref["features"]
    if "fid" in cfg.metrics:
        out.put("fid", name, M.frechet_distance(
            *M.gaussian_stats(real, shrinkage=cfg.shrinkage, name=f"{cfg.ref} features"),
            *M.gaussian_stats(feats, shrinkage=cfg.shrinkage, name=f"{samples.folder} features")))
    manifold = M.manifold_metrics(real, feats, pr_k=cfg.k if "pr" in cfg.metrics else None,
                                  dc_k=cfg.dc_k if "dc" in cfg.metrics else None)  # fmt: skip
    for key, value in manifold.items():
        out.put(key, name, value)
    if "top-pr" in cfg.metrics:
        t = M.top_pr(real, feats, seed=cfg.top_pr_seed)
        for key in ("top_precision", "top_recall", "top_f1"):
            out.put(key, name, t[key])
        out.detail("top_pr", name, {k: t[k] for k in t if k.split("_")[0] in ("bandwidth", "band")})
    if "rmd" in cfg.metrics:
        model = M.RMDModel(real, ref["labels"], shrinkage=cfg.shrinkage)
        scores = model.scores(feats, samples.labels)
        out.put("rmd_top1", name, stats.top_fraction_mean(scores))
        out.scores(name, "rmd", scores)


def _probability_metrics(name: str, probs: np.ndarray, ref: dict, labels: np.ndarray,
                         cfg: EvalConfig, out: _Collector, native: dict) -> None:
    """IS-style score (samples and reference) and condition accuracy from a classifier, with
    the classifier's accuracy on the real reference images through the samples' pipeline
    (``real_accuracy``) and as they are (``real_accuracy_native``)."""
    if "is" in cfg.metrics:
        mean, std = M.inception_score(probs, min(cfg.is_splits, len(probs)))
        out.put("is", name, mean)
        out.put("is_std", name, std)
        out.put("is_real", name, M.inception_score(ref["probs"], cfg.is_splits)[0])
    if "condition-accuracy" in cfg.metrics:
        out.put("condition_accuracy", name, M.condition_accuracy(probs, labels))
        out.put("real_accuracy", name, M.condition_accuracy(ref["probs"], ref["labels"]))
        out.put("real_accuracy_native", name, M.condition_accuracy(native["probs"], native["labels"]))


def _train_metrics(name: str, feats: np.ndarray, real: np.ndarray, train: np.ndarray,
                   cfg: EvalConfig, out: _Collector) -> None:
    """Average top-5 L2 and memorization ratio from one k-NN pass to the training features."""
    knn = "knn-l2" in cfg.metrics
    dist = M.train_distances(feats, train, 5 if knn else 1)
    out.scores(name, "train_l2_nearest", dist[:, 0])
    if knn:
        out.put("avg_top5_l2", name, dist.mean())
        out.scores(name, "train_l2_top5", dist.mean(1))
    if "memorization" in cfg.metrics:
        thr = cfg.memorization_threshold
        if thr is None:
            thr = M.memorization_threshold(real, train, cfg.memorization_percentile)
        out.put("memorization_ratio", name, M.share_below(dist[:, 0], thr))
        out.detail("memorization_threshold", name, thr)
