"""Text studies: caption-corruption variants and text defaults in the spec, and a tiny form of
the scenes-quick preset run end to end (paired test captions, text report sections)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condnoise.errors import UserError
from condnoise.study.grid import build_cells
from condnoise.study.spec import load_study, preset_names, validate

TEXT_ARCH = {"family": "conv-unet", "size": "tiny", "cond_dim": 32,
             "encoder": {"name": "bert-embed", "max_length": 48, "depth": 1, "heads": 2}}  # fmt: skip
CLASS_ARCH = {"family": "conv-unet", "size": "tiny"}


def _raw(arch, **extra):
    raw = {"name": "t", "data": {"source": "scenes"}, "architectures": {"u": arch},
           "variants": ["clean"], "sample": {"steps": 2, "num_samples": 4, "guidance": [1]}}  # fmt: skip
    return raw | extra


def test_text_presets_defaults_and_kind_checks():
    assert {"scenes-quick", "cc3m-ldm4"} <= set(preset_names())
    quick = load_study("scenes-quick")
    kinds = [v.kind for v in quick.variants]
    assert kinds == ["clean", "swap", "rewrite", "cep-u"] and len(quick.seeds) >= 3
    assert quick.sample["captions_from"] == "test" and quick.evaluate["extractors"] == ["scenes-clip"]
    cc3m = load_study("cc3m-ldm4")
    names = {v.name for v in cc3m.variants}
    assert {f"{k}-{e}%" for k in ("swap", "rewrite") for e in ("2.5", "5", "7.5", "10")} <= names
    assert {"cep-u", "cep-g", "random-swap-5%"} <= names
    train = next(c for c in build_cells(cc3m) if c.stage == "train")
    assert train.config["train"]["train"]["steps"] == 396000
    assert train.config["model"]["encoder"]["name"] == "bert-embed"
    spec = validate(_raw(TEXT_ARCH), "t.yaml")  # text defaults filled in
    assert spec.evaluate["metrics"][:3] == ["fid", "pr", "clip-score"] and spec.report["theory"] is False
    with pytest.raises(UserError, match="'symmetric' does not apply.*caption"):
        validate(_raw(TEXT_ARCH, variants=[{"name": "x", "corruption": {"kind": "symmetric", "eta": 0.05}}]), "t")
    with pytest.raises(UserError, match="'swap' does not apply.*class-label"):
        validate(_raw(CLASS_ARCH, corruption_grid={"kinds": ["swap"], "etas": [0.05]}), "t")
    with pytest.raises(UserError, match="sample.captions_from is for text models"):
        validate(_raw(CLASS_ARCH, sample={"steps": 2, "num_samples": 4, "guidance": [1],
                                          "captions_from": "test"}), "t")  # fmt: skip


TINY = [
    "seeds=[0]", "data.max_samples=256",
    "architectures.unet={preset: scenes-conv32, size: tiny, cond_dim: 32, "
    "encoder: {name: bert-embed, max_length: 48, depth: 1, heads: 2}}",
    "train.train={steps: 3, batch_size: 8, ckpt_every: 3, log_every: 1, warmup: 0}",
    "sample={sampler: dpm++, steps: 2, num_samples: 12, guidance: [1.0, 3.0], batch_size: 12, "
    "clip_x0: true, captions_from: test}",
    "evaluate.reference_samples=200", "evaluate.shrinkage=0.5", "report.grid_per_class=1",
]  # fmt: skip


def test_scenes_quick_tiny_runs_and_reports(tmp_path, text_eval_cache, monkeypatch):
    """scenes-quick at toy size through the real stages: sample i carries test caption i,
    the evaluation scores it against that caption, the report fills its text sections."""
    from condnoise.data import open_source
    from condnoise.study.runner import run_study

    monkeypatch.setenv("CONDNOISE_CACHE", str(text_eval_cache))
    spec = load_study("scenes-quick", TINY)
    result = run_study(spec, tmp_path / "s", progress=False, log_fn=lambda s: None)
    cells = {c.id: c for c in build_cells(spec)}
    sample = cells["sample/unet/rewrite-5%/seed0/s3"].dir(tmp_path / "s") / "s3" / "samples.npz"
    with np.load(sample) as z:
        test = open_source("scenes", "test").conditions()
        assert list(z["captions"]) == [str(c) for c in test[:12]]
        assert list(z["source_indices"]) == list(range(12))
    metrics = json.loads((cells["evaluate/unet/clean/seed0/s3"].dir(tmp_path / "s")
                          / "metrics.json").read_text())["metrics"]  # fmt: skip
    assert {"fid", "clip_score", "r_precision", "caption_all"} <= set(metrics)
    assert 0 <= metrics["clip_score"]["scenes-clip"] <= 100
    report = result.report.parent
    sections = {s["id"]: s for s in json.loads((report / "report.json").read_text())["sections"]}
    for sid in ("text-table1", "text-fid-clip", "caption-accuracy", "swap-vs-rewrite", "samples"):
        assert sections[sid]["status"] == "populated" and sections[sid]["blocks"] > 0, sections[sid]
    assert sections["accuracy"]["status"] == "not-applicable"  # no class labels
    md = (report / "report.md").read_text()
    assert "CLIP score" in md and "rewrite - swap" in md
    prompts = json.loads((cells["walk/unet/clean"].dir(tmp_path / "s") / "prompts.json").read_text())
    assert prompts["prompts"] == [str(c) for c in test[:6]]
