"""The prompts a text-to-image sample folder was generated from, and their scenes records.

A folder written by ``condnoise sample --prompt / --prompts / --captions-from SPLIT`` names
its prompts in one of two ways (either in ``samples.npz`` or in ``meta.json``):

- ``captions``: the prompt texts;
- ``source_split`` + ``source_indices``: indices into the captions of that split of the
  data source (``source_data`` if given, else the data of ``--ref``, e.g. ``scenes``).

Either list holds one prompt per sample, or fewer prompts that ``labels`` index (sample i
shows prompt ``labels[i]``, as several samples per prompt are usually drawn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condnoise.errors import UserError


def _scalar(value):
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _from_source(folder: Path, meta: dict, arrays: dict, default_data: str) -> list[str] | None:
    split = _scalar(arrays.get("source_split", meta.get("source_split")))
    indices = arrays.get("source_indices", meta.get("source_indices"))
    if split is None and indices is None:
        return None
    if split is None or indices is None:
        raise UserError(f"{folder}: source_split and source_indices must be given together")
    from condnoise.data.sources import open_source

    data = str(_scalar(meta.get("source_data") or arrays.get("source_data")) or default_data)
    pool = open_source(data, str(split)).conditions()
    if len(pool) and not isinstance(pool[0], str):
        raise UserError(f"{folder}: source {data}:{split} has class labels, not captions "
                        "(give --ref the captioned data, e.g. scenes:test)")
    idx = np.asarray(indices)
    if idx.ndim != 1 or (len(idx) and not np.issubdtype(idx.dtype, np.integer)):
        raise UserError(f"{folder}: source_indices must be a list of integers")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(pool)):
        raise UserError(f"{folder}: source_indices outside 0..{len(pool) - 1} of {data}:{split}")
    return [pool[i] for i in idx.tolist()]


def prompt_list(folder: Path, meta: dict, arrays: dict, default_data: str) -> list[str] | None:
    """The folder's prompt list as stored (None when it names none)."""
    caps = arrays.get("captions", meta.get("captions"))
    if caps is None:
        return _from_source(folder, meta, arrays, default_data)
    caps = np.asarray(caps).tolist() if isinstance(caps, np.ndarray) else caps
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise UserError(f"{folder}: captions must be a list of strings")
    return caps


def per_sample(folder: Path, prompts: list[str], labels: np.ndarray | None, n: int) -> list[str]:
    """One prompt per sample: the list itself (length n) or ``prompts[labels]``."""
    if len(prompts) == n:
        return list(prompts)
    if labels is None or len(labels) != n:
        raise UserError(f"{folder}: {len(prompts)} prompts for {n} samples and no labels that "
                        "index them")
    if n and (labels.min() < 0 or labels.max() >= len(prompts)):
        raise UserError(f"{folder}: labels outside 0..{len(prompts) - 1} index no prompt")
    return [prompts[i] for i in labels.tolist()]


def prompt_records(folder: Path, prompts: list[str]) -> list[dict]:
    """The scenes record of each prompt (``parse_caption``); a prompt that is not a scenes
    caption is a UserError naming it."""
    from condnoise.data.scenes import CaptionParseError, parse_caption

    out = []
    for i, text in enumerate(prompts):
        try:
            out.append(parse_caption(text))
        except CaptionParseError as e:
            raise UserError(f"{folder}: prompt {i}: {e}") from None
    return out


def novel_mask(records: list[dict]) -> np.ndarray:
    """bool [N]: the prompt names a held-out (class, colour) pair (a ``test-novel`` kind of
    prompt); False: every pair occurs in ``train`` (the ``test`` kind)."""
    from condnoise.data.scenes import HELD_OUT

    held = set(HELD_OUT)
    return np.array([any((it["class_name"], it["colour"]) in held for it in r["items"])
                     for r in records], dtype=bool)  # fmt: skip
