"""Text-to-image studies: the study settings and stage steps that differ from class labels.

A study is a *text* study when its architectures condition on captions (a text
``model.encoder``, e.g. ``bert-embed``: LDM's trainable BERT-style embedder, paper Sec. 4).
Its data corruptions are the caption kinds ``swap`` / ``rewrite`` (Sec. 2, text), CEP-U /
CEP-G act on the token embeddings and ``random-flip`` swaps captions per step (App. E.4);
sample cells generate from the captions of a split, paired (sample i gets caption i, as
``condnoise sample --captions-from``), and evaluate cells measure FID / precision-recall in
the text-image extractor's space, CLIP score, R-precision and, on ``scenes``, caption
accuracy (Sec. 5 text metrics, small-scale stand-ins where CLIP weights are absent).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from condnoise.errors import UserError

if TYPE_CHECKING:
    from condnoise.study.grid import Cell
    from condnoise.study.runner import RunContext
    from condnoise.study.spec import StudySpec

CLASS_KINDS = ("symmetric", "asymmetric")
CAPTION_KINDS = ("swap", "rewrite")
TEXT_METRICS = ("fid", "pr", "clip-score", "r-precision", "caption-accuracy")
DEFAULT_EXTRACTORS = ["scenes-clip"]
DEFAULT_CAPTIONS_FROM = "test"
GRID_PROMPTS = 6  # rows of a text model's sample grid: the first captions of the split


def is_text_model(model: dict[str, Any]) -> bool:
    """Whether a (validated) model config conditions on captions."""
    from condnoise.models.config import ModelConfig

    return ModelConfig.from_dict(model, origin="architecture", prefix="").is_text


def is_text_study(spec: StudySpec) -> bool:
    return any(is_text_model(m) for m in spec.architectures.values())


def apply_text_defaults(raw: dict[str, Any], archs: dict[str, dict[str, Any]], where: str
                        ) -> dict[str, Any]:  # fmt: skip
    """``raw`` with the text defaults filled in (extractors, metrics, ``sample.captions_from``)
    when the architectures are text models; checks that every corruption kind matches the
    condition type. Class studies come back unchanged."""
    text = {a: is_text_model(m) for a, m in archs.items()}
    if len(set(text.values())) > 1:
        raise UserError(f"{where}: architectures mix class and text models "
                        f"({', '.join(a for a, t in text.items() if t)} are text); one study, one kind")
    is_text = any(text.values())
    allowed = CAPTION_KINDS if is_text else CLASS_KINDS
    kinds = [c.get("kind") for c in _corruptions(raw)]
    bad = [k for k in kinds if k not in allowed]
    if bad:
        what = "caption (text models)" if is_text else "class-label"
        raise UserError(f"{where}: corruption kind {bad[0]!r} does not apply to this study's "
                        f"{what} conditions; choose one of {allowed}")
    if not is_text:
        for key in ("captions_from", "captions_data"):
            if key in (raw.get("sample") or {}):
                raise UserError(f"{where}: sample.{key} is for text models (a text "
                                "model.encoder); this study's architectures take class labels")
        return raw
    out = copy.deepcopy(raw)
    ev = out.setdefault("evaluate", {})
    ev.setdefault("extractors", list(DEFAULT_EXTRACTORS))
    ev.setdefault("metrics", list(TEXT_METRICS))
    out.setdefault("sample", {}).setdefault("captions_from", DEFAULT_CAPTIONS_FROM)
    out.setdefault("report", {}).setdefault("theory", False)
    return out


def _corruptions(raw: dict[str, Any]) -> list[dict[str, Any]]:
    listed = [v["corruption"] for v in raw.get("variants") or []
              if isinstance(v, dict) and isinstance(v.get("corruption"), dict)]  # fmt: skip
    grid = raw.get("corruption_grid")
    if isinstance(grid, dict) and isinstance(grid.get("kinds"), list):
        listed += [{"kind": k} for k in grid["kinds"]]
    return listed


# --------------------------------------------------------------------------- stages


def sample_prompts(cell: Cell, ctx: RunContext) -> Any:
    """The paired captions a text sample cell generates from (``sample.captions_from`` of
    ``sample.captions_data``, default: the training data source), through the same code
    path as ``condnoise sample --captions-from``; None for a class study."""
    s = cell.config["sample"]
    if not s.get("captions_from"):
        return None
    return _split_prompts(s, ctx.cells[cell.deps[0]].config["data"])


def _split_prompts(sample: dict[str, Any], data: dict[str, Any]) -> Any:
    """``sample.captions_from`` of ``sample.captions_data`` (default: the ``data`` source)."""
    from condnoise.training.splits import split_prompts

    return split_prompts(str(sample.get("captions_data") or data["source"]), str(sample["captions_from"]),
                         data.get("data_dir"))  # fmt: skip


def run_text_grid(cell: Cell, cell_dir: Path, run: Any, data: dict[str, Any]) -> dict:
    """A text model's sample grid: one row per caption (the first ``GRID_PROMPTS`` of the
    sample split), ``grid_per_class`` samples each, the caption printed above its row."""
    from condnoise.diffusion.sampling import sample_grid
    from condnoise.io import write_json

    c, s = cell.config, cell.config["sample"]
    prompts = _split_prompts(s, data)
    texts = prompts.texts[:GRID_PROMPTS]
    sample_grid(
        run.model, run.schedule, run.model.encoder.tokenize(texts), int(c["grid_per_class"]),
        cell_dir / "grid.png", shape=run.latent_shape, guidance=float(c["scale"]),
        steps=int(s["steps"]), seed=int(c["seed"]), sampler=str(s.get("sampler", "dpm++")),
        autoencoder=run.autoencoder, clip_x0=bool(s.get("clip_x0", False)), row_labels=texts,
    )  # fmt: skip
    write_json(cell_dir / "prompts.json", {"source": prompts.source, "prompts": texts})
    return {"prompts": len(texts)}
