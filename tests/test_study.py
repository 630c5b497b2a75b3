"""Study orchestration: spec validation, cell graph and cache keys, CI aggregation, and the
micro preset run end to end through the real pipeline (killed mid-grid, then resumed)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from condnoise.errors import UserError
from condnoise.study.aggregate import compare, estimate
from condnoise.study.cache import CellLog, claim, config_key
from condnoise.study.grid import build_cells, select
from condnoise.study.spec import load_study, preset_names, validate

REPO = Path(__file__).resolve().parents[1]


def _raw(**extra):
    raw = {
        "name": "t",
        "seeds": [0, 1],
        "architectures": {"dit": {"family": "dit", "size": "S/8", "hidden": 32, "depth": 2,
                                  "heads": 2}},  # fmt: skip
        "variants": ["clean", {"name": "cep-u", "perturbation": {"name": "cep-u", "gamma": 1}}],
        "sample": {"sampler": "dpm++", "steps": 5, "num_samples": 10, "guidance": [1, 2]},
    }
    raw.update(extra)
    return raw


# --------------------------------------------------------------------------- spec


def test_every_preset_validates_and_plans():
    names = preset_names()
    assert {"micro", "fmnist-quick", "fmnist-full", "in1k-dit-xl2", "in1k-ldm4"} <= set(names)
    for name in names:
        spec = load_study(name)
        cells = build_cells(spec)
        stages = {c.stage for c in cells}
        assert {"train", "sample", "evaluate"} <= stages, name
        n_models = sum(len(v.architectures or spec.architectures) for v in spec.variants)
        assert sum(c.stage == "train" for c in cells) == n_models * len(spec.seeds)
        assert all(c.est_seconds > 0 for c in cells)
    full = load_study("fmnist-full")
    kinds = {(v.kind, v.eta) for v in full.variants if v.corruption}
    assert len(kinds) == 12  # 6 ratios x {symmetric, asymmetric}
    # the gamma=1 ablation point is the headline CEP-G recipe: trained once, not twice
    gammas = [v.perturbation.get("gamma") for v in full.variants if v.perturbation["name"] == "cep-g"]
    assert sorted(gammas) == [0.1, 0.5, 1.0, 5.0, 10.0]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"bogus": 1}, "bogus"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [0, 0]}, "duplicates"),
        ({"variants": [{"name": "x", "corruption": {"kind": "symmetric", "eta": 5}}]}, "eta"),
        ({"variants": [{"name": "x", "corruption": {"kind": "diagonal", "eta": 0.1}}]}, "kind"),
        ({"variants": [{"name": "x", "perturbation": {"name": "cep-z"}}]}, "cep-z"),
        ({"variants": [{"name": "x", "perturbation": {"name": "cep-u", "sigma": 1}}]}, "sigma"),
        ({"sample": {"steps": 5, "num_samples": 10, "guidance": [-1]}}, "guidance"),
        ({"architectures": {"dit": {"family": "dit", "size": "Q/3"}}}, "Q/3"),
        ({"architectures": {"dit": {"family": "dit", "perturbation": "cep-u"}}}, "variants"),
    ],
)
def test_bad_study_fields_raise_user_error(change, needle):
    with pytest.raises(UserError, match=needle):
        validate(_raw(**change), "study.yaml")


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown study preset"):
        load_study("no-such-preset")
    with pytest.raises(UserError, match="does not exist"):
        load_study(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_study(str(bad))


# --------------------------------------------------------------------------- cells and keys


def test_cache_keys_follow_the_resolved_config():
    a = {c.id: c for c in build_cells(validate(_raw(), "a"))}
    b = {c.id: c for c in build_cells(validate(_raw(), "b"))}
    assert {k: c.key for k, c in a.items()} == {k: c.key for k, c in b.items()}
    # more sampler steps: train keys unchanged, sample and evaluate keys change
    raw = _raw(sample={"sampler": "dpm++", "steps": 7, "num_samples": 10, "guidance": [1, 2]})
    c = {x.id: x for x in build_cells(validate(raw, "c"))}
    for cid, cell in a.items():
        same = cell.stage in ("corrupt", "train", "theory")
        assert (c[cid].key == cell.key) == same, cid
    assert len({cell.key for cell in a.values()}) == len(a)  # no collisions
    assert config_key({"x": 1, "y": [1, 2]}) == config_key({"y": [1, 2], "x": 1})


def test_select_only_and_stage_keep_dependencies():
    cells = build_cells(load_study("micro"))
    chosen = select(cells, stages=None, only=["evaluate/dit/sym-5%/seed1/s3"])
    ids = [c.id for c in chosen]
    assert ids == ["corrupt/sym-5%/seed1", "train/dit/sym-5%/seed1",
                   "sample/dit/sym-5%/seed1/s3", "evaluate/dit/sym-5%/seed1/s3"]  # fmt: skip
    assert {c.stage for c in select(cells, stages=["train"], only=None)} == {"train"}
    with pytest.raises(UserError, match="no cell id matches"):
        select(cells, stages=None, only=["nothing-like-this"])
    with pytest.raises(UserError, match="unknown stage"):
        select(cells, stages=["bake"], only=None)


def test_cell_log_and_claims(tmp_path):
    log = CellLog(tmp_path / "cells.jsonl")
    log.append("start", "train/x", "k1")
    log.append("end", "train/x", "k1", seconds=1.5)
    with open(log.path, "a") as f:
        f.write('{"torn": ')  # a crash mid-line must not break the reader
    assert [e["event"] for e in log.events()] == ["start", "end"]
    assert log.durations() == {"k1": 1.5}
    cell = tmp_path / "cells" / "train" / "k1"
    with claim(cell) as mine, claim(cell) as other:
        assert mine and not other
    with claim(cell) as again:
        assert again  # released


# --------------------------------------------------------------------------- statistics


def test_estimate_is_the_student_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        x = rng.normal(5.0, 2.0, size=n)
        e = estimate(x)
        lo, hi = stats.t.interval(0.95, df=n - 1, loc=x.mean(), scale=stats.sem(x))
        assert e.n == n and math.isclose(e.mean, x.mean())
        assert math.isclose(e.low, lo, rel_tol=1e-9) and math.isclose(e.high, hi, rel_tol=1e-9)
    one = estimate([3.0])
    assert one.n == 1 and math.isnan(one.ci) and "n=1" in one.fmt()
    assert estimate([float("nan"), 1.0, 3.0]).n == 2


def test_compare_verdicts():
    low, high = estimate([1.0, 1.1, 0.9, 1.05]), estimate([3.0, 3.2, 2.9, 3.1])
    assert compare(low, high, lower_is_better=True).verdict == "better"
    assert compare(high, low, lower_is_better=True).verdict == "worse"
    assert compare(high, low, lower_is_better=False).verdict == "better"
    noisy = estimate([1.0, 5.0, 2.0])
    assert compare(noisy, estimate([2.0, 3.0, 4.0]), lower_is_better=True).verdict == (
        "indistinguishable"
    )


# --------------------------------------------------------------------------- end to end


def _events(study_dir: Path) -> list[dict]:
    return CellLog(study_dir / "cells.jsonl").events()


def test_micro_study_killed_resumed_and_reported(tmp_path, eval_cache, monkeypatch):
    """The real pipeline at toy scale. A first run is SIGKILLed after a few cells finish;
    the rerun must not redo them; a third run does nothing; the report is complete."""
    from condnoise.study.runner import run_study

    monkeypatch.setenv("CONDNOISE_CACHE", str(eval_cache))
    study_dir = tmp_path / "micro"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "condnoise", "study", "micro", "--out", str(study_dir),
         "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ends = [e for e in _events(study_dir) if e["event"] == "end"]
        if any(e["cell"].startswith("train/") for e in ends):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _events(study_dir)
    finished = {e["cell"]: e["time_utc"] for e in before if e["event"] == "end"}
    assert any(c.startswith("train/") for c in finished)

    spec = load_study("micro")
    result = run_study(spec, study_dir, progress=False, log_fn=lambda s: None)
    events = _events(study_dir)[len(before):]
    restarted = {e["cell"] for e in events if e["event"] == "start"}
    assert not restarted & set(finished), "finished cells were redone after the kill"
    assert set(finished) <= {e["cell"] for e in events if e["event"] == "skip"}
    assert set(result.ran) == {c.id for c in build_cells(spec)} - set(finished)
    for cid in finished:  # done markers untouched: finished before the kill
        cell = next(c for c in build_cells(spec) if c.id == cid)
        done = json.loads((cell.dir(study_dir) / "done.json").read_text())
        assert done["finished_utc"] <= min(e["time_utc"] for e in events)

    again = run_study(spec, study_dir, progress=False, log_fn=lambda s: None)
    assert again.ran == [] and len(again.skipped) == len(build_cells(spec))

    report = study_dir / "report" / "report.html"
    assert report.is_file() and again.report == report
    text = report.read_text()
    assert "<img src='data:image/png;base64," in text
    assert "src='http" not in text and "<link" not in text and "<script" not in text
    sections = {s["id"]: s for s in json.loads((report.parent / "report.json").read_text())["sections"]}
    expected_populated = {
        "verdict", "table1", "fid-guidance-eta", "fid-guidance-perturbation",
        "precision-recall", "rmd", "accuracy", "memorization", "ablation", "samples", "theory",
    }  # fmt: skip
    for sid in expected_populated:
        assert sections[sid]["status"] == "populated" and sections[sid]["blocks"] > 0, sections[sid]
    assert sections["table6"]["status"] == "not-in-grid"
    assert "not in this preset's grid" in sections["table6"]["note"]
    assert sections["entropy"]["status"] == "not-applicable"
    assert all(s["status"] != "incomplete" for s in sections.values())
    rows = (report.parent / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 * 2  # header + variants x seeds x scales
    md = (report.parent / "report.md").read_text()
    assert "Table 1" in md and "(figures/" in md
