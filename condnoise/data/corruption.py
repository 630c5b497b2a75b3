"""Fixed synthetic condition corruption (paper section 2): build a ``Manifest``.

Every kind corrupts **exactly** ``k = round(ratio * N)`` samples (Python's ``round``,
ties to even), each of which ends up with a condition different from its original.
All randomness comes from ``numpy.random.default_rng(seed)`` (PCG64), so a manifest is
identical on every machine.

- ``symmetric``: k samples uniformly at random; each gets a class drawn from the class
  prior restricted to the other classes (renormalised).
- ``asymmetric``: k samples drawn uniformly among those whose class is in the subset S
  (``classes``); each moves to another class of S, drawn from the prior restricted to
  S minus its class. ``ratio`` is a fraction of the *whole* dataset, so at most
  ``|{i: y_i in S}|`` samples can be corrupted (UserError otherwise). Fashion-MNIST's
  default S is T-shirt/top, Pullover, Coat, Shirt (the visually confusable tops).
- ``swap``: captions exchanged within random pairs of differing captions (one 3-cycle
  of pairwise-different captions when k is odd; k = 1 gives one sample another
  sample's caption), so every counted sample really carries a foreign caption.
- ``rewrite``: k samples; each caption rewritten by a ``Rewriter`` at a severity drawn
  uniformly from 1..5. Built-in rewriters by name (``resolve_rewriter``): ``rule``
  (``RuleRewriter`` fitted on the dataset's captions, the default) and, for sources with
  attribute records (``scenes``, where ``attributes`` is the default), ``attributes`` /
  ``paraphrase``. A source with ``annotate_manifest`` adds sidecar files to caption
  manifests (scenes: the attribute changes of every row).

``random`` (appendix E.4, labels re-drawn on every read) is not a manifest: see
``views.RandomFlipView`` and ``random_flip.relabel``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from condnoise.data.manifest import Manifest, load_manifest_labels
from condnoise.data.random_flip import RandomRelabeler, relabel
from condnoise.data.rewrite import SEVERITIES, Rewriter, RuleRewriter
from condnoise.data.views import CorruptedView, RandomFlipView
from condnoise.errors import UserError

__all__ = [
    "CorruptedView", "Manifest", "RandomFlipView", "RandomRelabeler", "Rewriter",
    "RuleRewriter", "corrupt", "load_manifest_labels", "relabel",
]  # fmt: skip

KINDS = ("symmetric", "asymmetric", "swap", "rewrite")
CLASS_KINDS = ("symmetric", "asymmetric")
CAPTION_KINDS = ("swap", "rewrite")
FMNIST_ASYMMETRIC_DEFAULT = ("T-shirt/top", "Pullover", "Coat", "Shirt")
REWRITE_MAX_TRIES = 10
BUILTIN_REWRITERS = ("rule", "attributes", "paraphrase")


def num_to_corrupt(ratio: float, n: int) -> int:
    """``round(ratio * n)`` after checking ``ratio`` lies in [0, 1]."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise UserError(f"ratio must lie in [0, 1], got {ratio}")
    return round(r * n)


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def resolve_classes(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Class names (or indices written as digits) -> sorted unique class indices."""
    lookup = {n: i for i, n in enumerate(class_names)}
    lower = {n.lower(): i for i, n in enumerate(class_names)}
    out: set[int] = set()
    for raw in names:
        name = raw.strip()
        if name in lookup:
            out.add(lookup[name])
        elif name.lower() in lower:
            out.add(lower[name.lower()])
        elif name.isdigit() and int(name) < len(class_names):
            out.add(int(name))
        else:
            raise UserError(
                f"unknown class name {name!r}; known classes: {', '.join(class_names)}"
            )
    return sorted(out)


def _draw_others(
    rng: np.random.Generator, labels: np.ndarray, prior: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """For each label y, a class from ``allowed`` minus {y}, weighted by ``prior``.

    Classes are processed in increasing order so the stream of draws is fixed.
    """
    new = np.empty_like(labels)
    for y in np.unique(labels):
        w = np.where(allowed, prior, 0.0).astype(np.float64)
        w[y] = 0.0
        if w.sum() <= 0:
            raise UserError(
                f"cannot corrupt class {int(y)}: no other allowed class has any samples"
            )
        sel = labels == y
        new[sel] = rng.choice(len(prior), size=int(sel.sum()), p=w / w.sum())
    return new


def corrupt_symmetric(labels: np.ndarray, prior: Sequence[float], ratio: float, seed: int):
    """``(index, original, corrupted)`` of the symmetric kind (see module docstring)."""
    rng = _rng(seed)
    n = len(labels)
    k = num_to_corrupt(ratio, n)
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    orig = labels[idx]
    allowed = np.ones(len(prior), dtype=bool)
    new = _draw_others(rng, orig, np.asarray(prior, np.float64), allowed)
    return idx.astype(np.int64), orig, new


def corrupt_asymmetric(
    labels: np.ndarray, prior: Sequence[float], ratio: float, seed: int, subset: Sequence[int]
):
    """``(index, original, corrupted)`` of the asymmetric kind (see module docstring)."""
    rng = _rng(seed)
    if len(set(subset)) < 2:
        raise UserError(f"asymmetric corruption needs at least 2 classes, got {len(set(subset))}")
    n = len(labels)
    k = num_to_corrupt(ratio, n)
    allowed = np.zeros(len(prior), dtype=bool)
    allowed[list(subset)] = True
    members = np.flatnonzero(allowed[labels])
    if k > len(members):
        raise UserError(
            f"ratio {ratio} asks for {k} corrupted samples but the class subset holds only "
            f"{len(members)} (max ratio {len(members) / n:.4f})"
        )
    idx = np.sort(rng.choice(members, size=k, replace=False)) if k else np.zeros(0, np.int64)
    orig = labels[idx]
    new = _draw_others(rng, orig, np.asarray(prior, np.float64), allowed)
    return idx.astype(np.int64), orig, new


def corrupt_swap(captions: Sequence[str], ratio: float, seed: int):
    """``(index, original, corrupted)`` of the swap kind (see module docstring)."""
    rng = _rng(seed)
    n = len(captions)
    k = num_to_corrupt(ratio, n)
    if k == 0:
        return np.zeros(0, np.int64), [], []
    if n < 2:
        raise UserError("swap corruption needs at least 2 captions")
    perm = rng.permutation(n)
    assign: dict[int, int] = {}  # sample -> sample whose caption it receives
    pos = 0
    if k % 2 == 1:
        group: list[int] = []
        while pos < n and len(group) < (1 if k == 1 else 3):
            i = int(perm[pos])
            pos += 1
            if all(captions[i] != captions[j] for j in group):
                group.append(i)
        if k == 1:
            donor = _first_different(captions, perm, pos, group[0]) if group else None
            if donor is None:
                raise UserError("swap corruption needs at least 2 different captions")
            assign[group[0]] = donor
        else:
            if len(group) < 3:
                raise UserError(
                    "swap corruption with an odd count needs 3 pairwise different captions"
                )
            a, b, c = group
            assign.update({a: b, b: c, c: a})
    pairs_needed = (k - len(assign)) // 2
    waiting: deque[int] = deque()  # unmatched samples; they always share one caption
    used = set(assign)
    while pairs_needed and pos < n:
        i = int(perm[pos])
        pos += 1
        if i in used:
            continue
        if waiting and captions[waiting[0]] != captions[i]:
            j = waiting.popleft()
            assign[i], assign[j] = j, i
            pairs_needed -= 1
        else:
            waiting.append(i)
    if pairs_needed:
        raise UserError(
            f"cannot give {k} samples a foreign caption by swapping: too many identical "
            f"captions (reached {len(assign)})"
        )
    idx = np.array(sorted(assign), dtype=np.int64)
    return idx, [captions[i] for i in idx], [captions[assign[int(i)]] for i in idx]


def _first_different(captions: Sequence[str], perm: np.ndarray, pos: int, i: int) -> int | None:
    for j in perm[pos:].tolist() + perm[:pos].tolist():
        if captions[j] != captions[i]:
            return int(j)
    return None


def corrupt_rewrite(
    captions: Sequence[str], ratio: float, seed: int, rewriter: Rewriter | None = None
):
    """``(index, original, corrupted, severities)`` of the rewrite kind."""
    rng = _rng(seed)
    n = len(captions)
    k = num_to_corrupt(ratio, n)
    rewriter = rewriter if rewriter is not None else RuleRewriter(captions)
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    severities = rng.choice(SEVERITIES, size=k)
    new: list[str] = []
    for i, sev in zip(idx.tolist(), severities.tolist()):
        cap = captions[i]
        for _ in range(REWRITE_MAX_TRIES):
            out = rewriter(cap, int(sev), rng)
            if not isinstance(out, str):
                raise UserError(f"rewriter returned {type(out).__name__}, not str, for index {i}")
            out = out.strip()
            if out and out != cap:
                break
        else:
            raise UserError(
                f"rewriter left caption {i} ({cap!r}) unchanged {REWRITE_MAX_TRIES} times"
            )
        new.append(out)
    return idx.astype(np.int64), [captions[i] for i in idx], new, severities


def resolve_rewriter(rewriter: Rewriter | str | None, source, captions) -> Rewriter:
    """A Rewriter as given, or the built-in one named (None: the source's default)."""
    if rewriter is not None and not isinstance(rewriter, str):
        return rewriter
    name = rewriter or getattr(source, "default_rewriter", "rule")
    if name not in BUILTIN_REWRITERS:
        raise UserError(f"unknown rewriter {name!r}; built-in: {', '.join(BUILTIN_REWRITERS)} "
                        "(or module:name)")  # fmt: skip
    if name == "rule":
        return RuleRewriter(captions)
    if not hasattr(source, "rewriter"):
        raise UserError(f"rewriter {name!r} needs a source with attribute records (scenes); "
                        f"use rule for {source.meta.name}")  # fmt: skip
    return source.rewriter(name)


def default_classes(meta) -> tuple[str, ...] | None:
    """The documented default asymmetric subset of a source, if it has one."""
    return FMNIST_ASYMMETRIC_DEFAULT if meta.name == "fashion-mnist" else None


def corrupt(
    source,
    kind: str,
    ratio: float,
    seed: int,
    *,
    classes: Sequence[str] | None = None,
    rewriter: Rewriter | str | None = None,
) -> Manifest:
    """Corrupt ``source`` (a ConditionalDataset) and return the Manifest (not yet saved).

    ``rewriter``: a Rewriter or a built-in name (see ``resolve_rewriter``)."""
    meta = source.meta
    _check_kind(meta, kind, classes)
    conds = source.conditions()
    params: dict = {}
    sev = None
    if kind == "symmetric":
        idx, orig, new = corrupt_symmetric(np.asarray(conds), meta.class_prior, ratio, seed)
    elif kind == "asymmetric":
        names = classes if classes is not None else default_classes(meta)
        if names is None:
            raise UserError(f"asymmetric corruption of {meta.name} needs --classes NAME,NAME,...")
        subset = resolve_classes(names, meta.class_names)
        params["classes"] = [meta.class_names[i] for i in subset]
        idx, orig, new = corrupt_asymmetric(
            np.asarray(conds), meta.class_prior, ratio, seed, subset
        )
    elif kind == "swap":
        idx, orig, new = corrupt_swap(conds, ratio, seed)
    else:
        rw = resolve_rewriter(rewriter, source, conds)
        idx, orig, new, sev = corrupt_rewrite(conds, ratio, seed, rw)
        params["rewriter"] = getattr(rw, "name", type(rw).__name__)
        params["severity_counts"] = {str(s): int((sev == s).sum()) for s in SEVERITIES}
    manifest = Manifest(
        source=meta.name, split=meta.split, kind=kind, ratio=float(ratio), seed=int(seed),
        n=meta.num_samples, condition_kind=meta.condition_kind, index=idx, original=orig,
        corrupted=new, class_names=tuple(meta.class_names), params=params,
    )  # fmt: skip
    if kind in CAPTION_KINDS and hasattr(source, "annotate_manifest"):
        source.annotate_manifest(manifest, sev)
    return manifest


def _check_kind(meta, kind: str, classes: Sequence[str] | None) -> None:
    """The kind exists, matches the condition type, and the source is not empty."""
    if kind == "random":
        raise UserError(
            "kind 'random' re-draws labels on every read and has no manifest; use "
            "RandomFlipView(source, ratio, seed) or the trainer's random-flip option"
        )
    if kind not in KINDS:
        raise UserError(f"unknown corruption kind {kind!r}; choose one of {', '.join(KINDS)}")
    ck = meta.condition_kind
    if kind in CLASS_KINDS and ck != "class":
        raise UserError(f"kind {kind!r} needs class labels but {meta.name} has captions; "
                        "use swap or rewrite")  # fmt: skip
    if kind in CAPTION_KINDS and ck != "caption":
        raise UserError(f"kind {kind!r} needs captions but {meta.name} has class labels; "
                        "use symmetric or asymmetric")  # fmt: skip
    if meta.num_samples == 0:
        raise UserError(f"data source {meta.name} ({meta.split}) is empty")
    if classes is not None and kind != "asymmetric":
        raise UserError("--classes applies only to --kind asymmetric")
