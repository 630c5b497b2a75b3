"""Study support for fine-tuning (issue 17 item 5): ``finetune`` variants on pre-training
cells, their controlled sample / evaluate cells, and the report's downstream table."""

from __future__ import annotations

import csv
import json
import math

import pytest

from condnoise.errors import UserError
from condnoise.study.cost import CostModel
from condnoise.study.grid import build_cells
from condnoise.study.spec import load_study, validate


def _raw(**extra):
    """A tiny clean U-Net base on 16 px Fashion-MNIST and a ControlNet on its Canny edges."""
    raw = {
        "name": "tiny-cn", "seeds": [0],
        "data": {"source": "fashion-mnist", "image_size": 16, "max_samples": 64},
        "architectures": {"unet": {"family": "unet", "size": "tiny"}},
        "variants": ["clean", {"name": "cn", "finetune": {"base": "clean", "adapter": "controlnet"}}],
        "finetune": {"control": "canny", "train": {"steps": 2, "batch_size": 8, "ckpt_every": 2}},
        "train": {"train": {"steps": 2, "batch_size": 8, "ckpt_every": 2, "warmup": 0}},
        "sample": {"sampler": "dpm++", "steps": 2, "num_samples": 16, "guidance": [2], "batch_size": 16},
        "evaluate": {"extractors": ["fmnist-classifier"], "reference_samples": 200,
                     "train_samples": 200, "shrinkage": 0.05},
        "report": {"walks": False, "theory": False},
    }  # fmt: skip
    raw.update(extra)
    return raw


def test_finetune_cells_follow_their_base():
    cells = {c.id: c for c in build_cells(validate(_raw(), "t"))}
    ft = cells["finetune/unet/cn/seed0"]
    assert ft.deps == ["train/unet/clean/seed0"]
    assert ft.config["parent_key"] == cells["train/unet/clean/seed0"].key
    assert ft.config["settings"]["adapter"] == {"kind": "controlnet"}
    sample = cells["sample/unet/cn/seed0/s2"]
    assert sample.deps == [ft.id] and sample.config["controls"] == {"split": "test", "kind": "canny"}
    assert "edge-f1" in cells["evaluate/unet/cn/seed0/s2"].config["evaluate"]["metrics"]
    ref = cells["sample/unet/clean/seed0/canny-recorded/s2"]  # the base without control
    assert ref.deps == ["train/unet/clean/seed0"] and ref.meta["applied"] is False
    assert "controls" not in cells["sample/unet/clean/seed0/s2"].config
    # retraining the base redoes the adapter and its cells; other adapter settings leave the base
    longer = {c.id: c for c in build_cells(validate(_raw(train={"train": {"steps": 3}}), "t"))}
    assert all(longer[i].key != c.key for i, c in cells.items())
    t2i = _raw()
    t2i["variants"][1]["finetune"]["adapter"] = "t2i-adapter"
    other = {c.id: c for c in build_cells(validate(t2i, "t"))}
    assert other["finetune/unet/cn/seed0"].config["settings"]["adapter"] == {
        "kind": "t2i-adapter", "t2i_type": "full", "num_res_blocks": 2}  # fmt: skip
    for cid in ("train/unet/clean/seed0", "sample/unet/clean/seed0/canny-recorded/s2"):
        assert other[cid].key == cells[cid].key


@pytest.mark.parametrize(
    ("finetune", "needle"),
    [
        ({"base": "nope"}, "'nope' is not a variant"),
        ({"base": "clean", "adapter": "lora"}, "lora"),
        ({"base": "clean", "control": "depth"}, "depth"),
        ({"base": "clean", "perturbation": "ip"}, "fine-tuning"),
        ({"base": "clean", "epochs": 0}, "epochs"),
        ({"base": "clean", "epochs": 2, "train": {"steps": 5}}, "both epochs"),
        ({"adapter": "controlnet"}, "needs 'base'"),
    ],
)
def test_bad_finetune_fields_raise_user_error(finetune, needle):
    raw = _raw(finetune=None)
    raw.pop("finetune")
    raw["variants"] = ["clean", {"name": "cn", "finetune": finetune}]
    with pytest.raises(UserError, match=needle):
        validate(raw, "study.yaml")


def test_finetune_presets_plan():
    """The three presets validate and plan: CPU, text (canny and mask) and GPU recipes."""
    cn = build_cells(load_study("fmnist-controlnet"))
    assert sum(c.stage == "finetune" for c in cn) == 12 * 3
    assert sum(c.est_seconds for c in cn) < 45 * 60  # the CPU budget of the preset
    scenes = load_study("scenes-controlnet")
    assert {v.settings["control"] for v in scenes.variants if v.method == "finetune"} == {"canny", "mask"}
    metrics = {m for c in build_cells(scenes) if c.stage == "evaluate" for m in c.config["evaluate"].get("metrics") or ()}
    assert {"edge-f1", "mask-iou"} <= metrics
    in100 = load_study("in100-controlnet")
    ft = next(c for c in build_cells(in100) if c.stage == "finetune")
    assert ft.config["settings"]["epochs"] == 10 and ft.deps == ["pretrained/ldm/clean"]
    steps = CostModel((3, 256, 256), in100.cost, []).epoch_steps(in100.data, 10, 256)
    assert steps == math.ceil(10 * 126689 / 256)  # 10 epochs of ImageNet-100 at batch 256


def test_finetune_study_end_to_end(tmp_path, eval_cache, monkeypatch):
    """Base -> ControlNet -> controlled samples -> edge F1 -> the downstream table."""
    from condnoise.study.runner import run_study

    monkeypatch.setenv("CONDNOISE_CACHE", str(eval_cache))
    spec = validate(_raw(), "tiny")
    result = run_study(spec, tmp_path / "s", progress=False, log_fn=lambda s: None)
    assert len(result.ran) == len(build_cells(spec))
    ft = next(c for c in build_cells(spec) if c.stage == "finetune")
    run = json.loads((ft.dir(tmp_path / "s") / "run" / "run.json").read_text())
    assert run["finetuned_from"]["adapter"] == "controlnet"
    report = tmp_path / "s" / "report"
    sections = {s["id"]: s for s in json.loads((report / "report.json").read_text())["sections"]}
    assert sections["downstream"]["status"] == "populated"
    rows = list(csv.DictReader((report / "downstream.csv").open()))
    assert [(r["model"], r["adapter"]) for r in rows] == [("cn", "controlnet"), ("clean", "without control")]
    for r in rows:
        f1 = float(r["control fidelity"].split()[0])
        assert 0.0 <= f1 <= 1.0 and float(r["FID"].split()[0]) > 0
    assert "Downstream" in (report / "report.md").read_text()
