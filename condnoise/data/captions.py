"""``captions:PATH``: image-caption pairs from a JSONL or CSV file.

Each record has an ``image`` field (a path, relative to the caption file's folder unless
absolute) and a ``caption`` field (non-empty text). JSONL: one JSON object per line
(``.jsonl``, ``.ndjson``, ``.json``); CSV: a header row naming the fields (``.csv``;
``.tsv`` is tab-separated). Missing image files are reported when the source is opened.
The file is one split; ``split`` is recorded as given.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from condnoise.data.base import DatasetMeta
from condnoise.data.files import FileDataset, probe_shape
from condnoise.errors import UserError

FIELDS = ("image", "caption")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with fields {FIELDS}")
            rows.append((lineno, rec))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [k for k in FIELDS if k not in header]
        if header and missing:
            raise UserError(
                f"{path}: header lacks the required field(s) {', '.join(missing)} "
                f"(found: {', '.join(header)})"
            )
        return [(reader.line_num, rec) for rec in reader]


def read_caption_file(path: Path) -> tuple[list[Path], list[str]]:
    """Parse and validate a caption file; return ``(image_paths, captions)``."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        rows = _read_jsonl(path)
    elif suffix in CSV_SUFFIXES:
        rows = _read_csv(path, CSV_SUFFIXES[suffix])
    else:
        raise UserError(
            f"caption file {path} must end in .jsonl, .ndjson, .json, .csv or .tsv"
        )
    if not rows:
        raise UserError(f"caption file {path} is empty (no records)")
    base = path.parent
    images: list[Path] = []
    captions: list[str] = []
    for lineno, rec in rows:
        for key in FIELDS:
            value = rec.get(key)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{path}:{lineno}: missing or empty field {key!r}")
        image = Path(rec["image"]).expanduser()
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            raise UserError(f"{path}:{lineno}: image file not found: {image}")
        images.append(image)
        captions.append(rec["caption"].strip())
    return images, captions


class CaptionFile(FileDataset):
    """Caption-conditional images listed in a JSONL / CSV file (see module docstring)."""

    def __init__(self, path: str, split: str = "train", *, image_size: int | None = None) -> None:
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise UserError(f"caption file not found: {file}")
        images, captions = read_caption_file(file)
        meta = DatasetMeta(
            name=f"captions:{file}",
            split=split,
            class_names=(),
            class_prior=(),
            num_samples=len(images),
            image_shape=probe_shape(images[0], image_size),
            condition_kind="caption",
        )
        super().__init__(meta, images, captions)
