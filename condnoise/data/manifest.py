"""The corruption manifest: which samples carry which wrong condition (paper section 2).

A corrupted dataset is a *view* = source + manifest; images are never copied. On disk:

- ``manifest.csv``: header ``index,original,corrupted``, one row per corrupted sample,
  sorted by index (class indices, or CSV-quoted caption strings);
- ``summary.json``: source, split, kind, ratio, seed, n, n_corrupted, class counts before
  and after, condnoise version, plus the condition kind and kind-specific parameters;
- ``provenance.json``: resolved config, seed, library versions;
- optional sidecar files a source adds (``Manifest.sidecars``, listed in the summary's
  ``sidecars``), e.g. the per-row attribute changes of ``scenes`` (``changes.jsonl``).

All are written atomically; an existing manifest is kept unless ``force``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condnoise import __version__
from condnoise.errors import UserError
from condnoise.io import atomic_path, write_json, write_text
from condnoise.provenance import write_provenance

HEADER = ("index", "original", "corrupted")
MANIFEST = "manifest.csv"
SUMMARY = "summary.json"


@dataclass
class Manifest:
    """Corrupted rows of one source split. ``original`` / ``corrupted`` are int64 arrays
    (class conditions) or lists of str (captions), aligned with the sorted ``index``."""

    source: str
    split: str
    kind: str
    ratio: float
    seed: int
    n: int
    condition_kind: str
    index: np.ndarray
    original: Any
    corrupted: Any
    class_names: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    sidecars: dict[str, str] = field(default_factory=dict)  # file name -> text

    @property
    def n_corrupted(self) -> int:
        return len(self.index)

    # -- applying ------------------------------------------------------------------------
    def apply(self, conditions):
        """Return a copy of ``conditions`` (the source's, index order) with the rows replaced."""
        if self.condition_kind == "class":
            out = np.array(conditions, dtype=np.int64, copy=True)
            out[self.index] = self.corrupted
            return out
        out = list(conditions)
        for i, c in zip(self.index.tolist(), self.corrupted):
            out[i] = c
        return out

    def check_matches(self, source) -> None:
        """UserError unless this manifest was made from ``source`` (name, split, n, kind and
        the original conditions of every corrupted row)."""
        meta = source.meta
        where = self.params.get("_dir", "manifest")
        for what, mine, theirs in (
            ("source", self.source, meta.name),
            ("split", self.split, meta.split),
            ("number of samples", self.n, meta.num_samples),
            ("condition kind", self.condition_kind, meta.condition_kind),
        ):
            if mine != theirs:
                raise UserError(f"{where} was made for {what} {mine!r}, not {theirs!r}")
        conds = source.conditions()
        if self.condition_kind == "class":
            actual = np.asarray(conds)[self.index]
            bad = np.flatnonzero(actual != np.asarray(self.original))
        else:
            bad = [j for j, i in enumerate(self.index.tolist()) if conds[i] != self.original[j]]
        if len(bad):
            j = int(bad[0])
            raise UserError(
                f"{where}: row for index {int(self.index[j])} says original "
                f"{self.original[j]!r} but the source has {conds[int(self.index[j])]!r}"
            )

    # -- summary -------------------------------------------------------------------------
    def class_counts(self, conditions) -> tuple[dict[str, int], dict[str, int]] | tuple[None, None]:
        if self.condition_kind != "class":
            return None, None
        before = np.bincount(np.asarray(conditions), minlength=len(self.class_names))
        after = np.bincount(self.apply(conditions), minlength=len(self.class_names))
        return (
            {n: int(c) for n, c in zip(self.class_names, before)},
            {n: int(c) for n, c in zip(self.class_names, after)},
        )

    def summary(self, conditions) -> dict[str, Any]:
        before, after = self.class_counts(conditions)
        params = {k: v for k, v in self.params.items() if not k.startswith("_")}
        return {
            "source": self.source,
            "split": self.split,
            "kind": self.kind,
            "ratio": self.ratio,
            "seed": self.seed,
            "n": self.n,
            "n_corrupted": self.n_corrupted,
            "condition_kind": self.condition_kind,
            "class_names": list(self.class_names),
            "class_counts_before": before,
            "class_counts_after": after,
            "params": params,
            "sidecars": sorted(self.sidecars),
            "condnoise_version": __version__,
        }

    # -- files ---------------------------------------------------------------------------
    def csv_text(self) -> str:
        buf = io.StringIO()
        quoting = csv.QUOTE_NONNUMERIC if self.condition_kind == "caption" else csv.QUOTE_MINIMAL
        writer = csv.writer(buf, quoting=quoting, lineterminator="\n")
        buf.write(",".join(HEADER) + "\n")
        orig = self.original.tolist() if isinstance(self.original, np.ndarray) else self.original
        corr = self.corrupted.tolist() if isinstance(self.corrupted, np.ndarray) else self.corrupted
        writer.writerows(zip(self.index.tolist(), orig, corr))
        return buf.getvalue()

    def save(
        self,
        out_dir: str | os.PathLike,
        conditions,
        *,
        force: bool = False,
        config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write manifest.csv, summary.json, provenance.json into ``out_dir`` atomically.

        ``conditions`` are the source's clean conditions (for the class counts). Raises a
        UserError if a manifest already exists there and ``force`` is false. Returns the
        summary.
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"output {out} exists and is not a folder")
        if (out / MANIFEST).exists() and not force:
            raise UserError(f"{out / MANIFEST} already exists; pass --force to overwrite it")
        summary = self.summary(conditions)
        text = self.csv_text()
        stale = _sidecars_of(out / SUMMARY) - set(self.sidecars)
        out.mkdir(parents=True, exist_ok=True)
        # All content is computed above; the renames below happen back to back.
        with atomic_path(out / MANIFEST) as tmp:
            tmp.write_text(text, encoding="utf-8")
            for name, body in self.sidecars.items():
                write_text(out / name, body)
            write_json(out / SUMMARY, summary)
        for name in stale:  # left by an earlier manifest in this folder (--force)
            (out / name).unlink(missing_ok=True)
        write_provenance(out, config or summary, self.seed)
        return summary

    @classmethod
    def load(cls, manifest_dir: str | os.PathLike) -> Manifest:
        """Read a manifest folder written by ``save`` (UserError naming the bad file/row)."""
        d = Path(manifest_dir)
        spath, mpath = d / SUMMARY, d / MANIFEST
        for p in (mpath, spath):
            if not p.is_file():
                raise UserError(f"manifest file not found: {p}")
        try:
            s = json.loads(spath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{spath}: invalid JSON ({e})") from None
        needed = ("source", "split", "kind", "ratio", "seed", "n", "n_corrupted", "condition_kind")
        missing = [k for k in needed if k not in s]
        if missing:
            raise UserError(f"{spath}: missing field(s) {', '.join(missing)}")
        kind = s["condition_kind"]
        index, orig, corr = _read_rows(mpath, kind, int(s["n"]))
        if len(index) != s["n_corrupted"]:
            raise UserError(f"{mpath} has {len(index)} rows but {spath} says {s['n_corrupted']}")
        return cls(
            source=s["source"],
            split=s["split"],
            kind=s["kind"],
            ratio=float(s["ratio"]),
            seed=int(s["seed"]),
            n=int(s["n"]),
            condition_kind=kind,
            index=index,
            original=orig,
            corrupted=corr,
            class_names=tuple(s.get("class_names") or ()),
            params={**(s.get("params") or {}), "_dir": str(d)},
        )


def _sidecars_of(summary_path: Path) -> set[str]:
    """Sidecar names an existing summary lists (plain file names only)."""
    try:
        names = json.loads(summary_path.read_text(encoding="utf-8")).get("sidecars") or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name}


def _read_rows(path: Path, kind: str, n: int) -> tuple[np.ndarray, Any, Any]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != HEADER:
            raise UserError(f"{path}: header must be {','.join(HEADER)}, got {header}")
        rows = list(reader)
    index = np.empty(len(rows), dtype=np.int64)
    orig: list = []
    corr: list = []
    for r, row in enumerate(rows):
        line = r + 2
        if len(row) != 3:
            raise UserError(f"{path}:{line}: expected 3 fields, got {len(row)}")
        try:
            index[r] = int(row[0])
            if kind == "class":
                orig.append(int(row[1]))
                corr.append(int(row[2]))
            else:
                orig.append(row[1])
                corr.append(row[2])
        except ValueError:
            raise UserError(f"{path}:{line}: not an integer in {row}") from None
        if not 0 <= index[r] < n:
            raise UserError(f"{path}:{line}: index {index[r]} outside [0, {n})")
    if len(index) > 1 and np.any(np.diff(index) <= 0):
        raise UserError(f"{path}: indices must be unique and sorted")
    if kind == "class":
        return index, np.asarray(orig, dtype=np.int64), np.asarray(corr, dtype=np.int64)
    return index, orig, corr


def load_manifest_labels(manifest_dir: str | os.PathLike, source) -> np.ndarray:
    """Corrupted labels (int64 [N]) of a class source, after checking the manifest matches it."""
    m = Manifest.load(manifest_dir)
    if m.condition_kind != "class":
        raise UserError(f"manifest {manifest_dir} corrupts captions, not class labels")
    m.check_matches(source)
    return m.apply(source.conditions())
