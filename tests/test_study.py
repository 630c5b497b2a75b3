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
import yaml
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
    assert {"micro", "fmnist-quick", "fmnist-full", "in1k-dit-xl2", "in1k-ldm4", "fmnist-lcm",
            "cc3m-lcm", "fmnist-ldm"} <= set(names)
    for name in names:
        spec = load_study(name)
        cells = build_cells(spec)
        stages = {c.stage for c in cells}
        assert {"sample", "evaluate"} <= stages and stages & {"train", "pretrained"}, name
        n_models = sum(len(v.architectures or spec.architectures) for v in spec.variants
                       if v.method == "train")  # fmt: skip
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


# --------------------------------------------------------------------------- derived variants


def _lcm_raw(**extra):
    """A clean teacher, a CEP-U teacher and three LCM students of them."""
    base = {
        "seeds": [0, 1, 2],
        "variants": ["clean", {"name": "cep-u", "perturbation": {"name": "cep-u", "gamma": 1}},
                     {"name": "lcm", "distill": {"teacher": "clean"}},
                     {"name": "lcm-cepu", "distill": {"teacher": "clean", "perturbation": "cep-u"}},
                     {"name": "lcm-cept", "distill": {"teacher": "cep-u"}}],
        "distill": {"solver_steps": 8, "train": {"steps": 3}},
        "step_sweep": {"steps": [1, 2, 4], "guidance": [2]},
    }  # fmt: skip
    return _raw(**{**base, **extra})


_CLEAN_CEP = ["clean", {"name": "cep-u", "perturbation": "cep-u"}]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"variants": ["clean", {"name": "s", "distill": {"teacher": "nope"}}]}, "'nope' is not a variant"),
        ({"variants": ["clean", {"name": "s", "distill": {"teacher": "clean"}},
                       {"name": "t", "distill": {"teacher": "s"}}]}, "needs a train or pretrained"),
        ({"variants": ["clean", {"name": "s", "distill": {"teacher": "clean", "bogus": 1}}]}, "bogus"),
        ({"variants": ["clean", {"name": "s", "distill": {"teacher": "clean", "perturbation": "ip"}}]},
         "CEP on the student"),
        ({"variants": ["clean", {"name": "s", "perturbation": "cep-u", "distill": {"teacher": "clean"}}]},
         "takes no"),
        ({"variants": ["clean", {"name": "s", "distill": {"solver_steps": 4}}]}, "needs 'teacher'"),
        ({"variants": ["clean", {"name": "s", "distill": {"teacher": "clean", "train": {"seed": 3}}}]},
         "seed"),
        ({"step_sweep": {"steps": [16]}}, "solver_steps"),
        ({"step_sweep": {"steps": []}}, "step_sweep.steps"),
        ({"step_sweep": None}, "few-step model"),
        ({"variants": _CLEAN_CEP, "distill": {}, "step_sweep": None}, "no variant has 'distill'"),
        ({"variants": _CLEAN_CEP, "distill": None}, "no variant is a few-step model"),
        ({"architectures": {"u": {"family": "conv-unet", "size": "tiny", "autoencoder": "study"}}},
         "no 'autoencoder' section"),
        ({"autoencoder": {"preset": "fmnist-vq-f4", "data": {"image_size": 28}}}, "the study's"),
        ({"autoencoder": {"preset": "fmnist-vq-f4", "quantise": True}}, "quantise"),
        ({"autoencoder": {"preset": "fmnist-vq-f4"}}, "no architecture uses it"),
    ],
)
def test_bad_derived_and_latent_fields_raise_user_error(change, needle):
    raw = _lcm_raw()
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(UserError, match=needle):
        validate(raw, "study.yaml")


def test_distill_cells_follow_their_teacher():
    spec = validate(_lcm_raw(), "lcm")
    assert [v.name for v in spec.variants] == ["clean", "cep-u", "lcm", "lcm-cepu", "lcm-cept"]
    cells = {c.id: c for c in build_cells(spec)}
    student = cells["distill/dit/lcm-cept/seed1"]
    assert student.deps == ["train/dit/cep-u/seed1"]
    assert student.config["settings"]["lcm"] == {"w_embed_dim": 256, "solver_steps": 8}
    # students: the step sweep only, with LCM; teachers: guidance sweep + step sweep (DPM++)
    assert not any(c.startswith("sample/dit/lcm/") and "/n" not in c for c in cells)
    assert cells["sample/dit/lcm/seed0/n4/s2"].config["sample"]["sampler"] == "lcm"
    assert cells["sample/dit/clean/seed0/n4/s2"].config["sample"]["sampler"] == "dpm++"
    assert cells["evaluate/dit/lcm/seed2/n1/s2"].meta["steps"] == 1
    # a longer teacher changes its students' keys; other student settings leave teachers alone
    longer = {c.id: c for c in build_cells(validate(_lcm_raw(train={"train": {"steps": 9}}), "b"))}
    assert longer["distill/dit/lcm/seed0"].key != cells["distill/dit/lcm/seed0"].key
    other = {c.id: c for c in build_cells(validate(_lcm_raw(distill={"solver_steps": 8, "train": {"steps": 5}}), "c"))}
    for cid, c in cells.items():
        assert (other[cid].key == c.key) == (not c.meta.get("variant", "").startswith("lcm")), cid
    # a model from outside the study: one cell for every seed
    ext = validate(_lcm_raw(variants=[{"name": "sd", "pretrained": {"path": "/models/run"}},
                                      {"name": "lcm", "distill": {"teacher": "sd"}}]), "d")  # fmt: skip
    ids = [c.id for c in build_cells(ext)]
    assert ids.count("pretrained/dit/sd") == 1 and "distill/dit/lcm/seed2" in ids


def test_steps_section_compares_students_paired_by_seed(tmp_path):
    """The report's few-step section on per-seed records: each student against its teacher at
    the same steps, each CEP student against the clean student: the verdict from the paired
    t-interval (scipy's ttest_rel), the Welch interval (condnoise.stats) beside it."""
    from scipy import stats as sstats

    from condnoise import stats as cstats
    from condnoise.study.fewstep import steps_section
    from condnoise.study.results import StudyResults

    spec = validate(_lcm_raw(), "lcm")
    fids = {"clean": [50.0, 52.0, 51.0], "cep-u": [49.0, 50.0, 51.0], "lcm": [30.0, 31.0, 29.0],
            "lcm-cepu": [29.0, 31.5, 28.0], "lcm-cept": [30.5, 30.0, 31.0]}  # fmt: skip
    records = [{"arch": "dit", "variant": v, "seed": seed, "scale": 2.0, "steps": n,
                "sampler": "lcm" if v.startswith("lcm") else "dpm++",
                "metrics": {"fmnist-classifier/fid": f + n}}
               for v, f3 in fids.items() for seed, f in enumerate(f3) for n in (1, 2, 4)]  # fmt: skip
    sec = steps_section(StudyResults(spec, tmp_path, step_records=records))
    assert sec.status == "populated"
    tables = [b for b in sec.blocks if hasattr(b, "rows")]
    assert [r[1] for r in tables[0].rows] == ["clean", "cep-u", "lcm", "lcm-cepu", "lcm-cept"]
    versus = {(r[1], r[2].split()[0], r[4]): r for r in tables[1].rows}
    d, lo, hi = cstats.welch_interval(np.array(fids["lcm"]) + 4, np.array(fids["clean"]) + 4)
    row = versus[("lcm", "clean", "4")]
    assert row[7] == f"{d:+.3g} [{lo:+.3g}, {hi:+.3g}]" and row[9] == "better"
    pd_ = np.mean(np.array(fids["lcm"]) - fids["clean"])
    plo, phi = sstats.ttest_rel(np.array(fids["lcm"]) + 4, np.array(fids["clean"]) + 4).confidence_interval()
    assert row[8] == f"{pd_:+.3g} [{plo:+.3g}, {phi:+.3g}]"
    assert versus[("lcm-cepu", "lcm", "4")][9] == "indistinguishable"
    assert versus[("lcm-cept", "cep-u", "2")][9] == "better"
    # pairing resolves what Welch cannot: a constant per-seed gain over widely spread seeds
    from condnoise.study.aggregate import Verdict, compare, compare_paired, estimate

    a, b = {0: 20.0, 1: 30.0, 2: 40.0}, {0: 21.0, 1: 31.5, 2: 41.0}
    assert compare(estimate(a.values()), estimate(b.values()), lower_is_better=True).verdict == Verdict.INDISTINGUISHABLE
    assert compare_paired(a, b, lower_is_better=True).verdict == Verdict.BETTER
    assert compare_paired(a, {0: 1.0}, lower_is_better=True).verdict == Verdict.NO_INTERVAL
    assert ("lcm", "lcm", "4") not in versus  # the reference student is not compared with itself


def test_latent_distill_study_end_to_end(tmp_path, eval_cache, monkeypatch):
    """A tiny autoencoder trained as the study's cell, a latent teacher on it, a CEP-U LCM
    student of that teacher, the step sweep; the entropy and few-step sections populate."""
    import csv

    from condnoise.study.runner import run_study

    monkeypatch.setenv("CONDNOISE_CACHE", str(eval_cache))
    raw = {
        "name": "tiny-ldm-lcm", "seeds": [0],
        "data": {"source": "fashion-mnist", "image_size": 32, "max_samples": 200},
        "autoencoder": {"preset": "fmnist-vq-f4", "data": {"max_samples": 64},
                        "model": {"width": 8, "codebook_size": 32, "mid_attention": False},
                        "loss": {"perceptual": "none", "disc_weight": 0},
                        "train": {"steps": 2, "batch_size": 8, "scaling_samples": 16, "warmup": 0,
                                  "ckpt_every": 2, "sample_every": 0}},
        "architectures": {"unet": {"family": "conv-unet", "size": "tiny", "autoencoder": "study"}},
        "variants": ["clean", {"name": "lcm-cepu", "distill": {
            "teacher": "clean", "perturbation": "cep-u", "solver_steps": 4, "w_embed_dim": 8,
            "train": {"steps": 2, "batch_size": 8, "ckpt_every": 2}}}],
        "train": {"train": {"steps": 2, "batch_size": 16, "ckpt_every": 2}},
        # the teacher's 2-step DPM-Solver++ cell at s=2 is both its sweep and its step sweep
        "sample": {"sampler": "dpm++", "steps": 2, "num_samples": 20, "guidance": [2], "batch_size": 20},
        "step_sweep": {"steps": [2], "guidance": [2]},
        "evaluate": {"extractors": ["fmnist-classifier"], "reference_samples": 500,
                     "train_samples": 500, "shrinkage": 0.05, "entropy_pool": 1024},
        "report": {"walks": False, "theory": False},
    }  # fmt: skip
    spec = validate(raw, "tiny")
    cells = build_cells(spec)
    assert {c.stage for c in cells} == {"autoencoder", "train", "distill", "sample", "evaluate"}
    assert len({c.key for c in cells}) == len(cells) - 2  # the shared teacher sample / evaluate
    result = run_study(spec, tmp_path / "s", progress=False, log_fn=lambda s: None)
    assert len(result.ran) == len(cells) - 2
    train = next(c for c in cells if c.stage == "train")
    assert train.config["autoencoder_key"] == cells[0].key
    run_cfg = yaml.safe_load((train.dir(tmp_path / "s") / "run" / "config.yaml").read_text())
    assert run_cfg["model"]["autoencoder"]["path"].endswith("run/autoencoder")
    student = next(c for c in cells if c.stage == "distill")
    s_cfg = yaml.safe_load((student.dir(tmp_path / "s") / "run" / "config.yaml").read_text())
    assert s_cfg["model"]["perturbation"]["name"] == "cep-u" and s_cfg["model"]["lcm"]["solver_steps"] == 4
    report = tmp_path / "s" / "report"
    sections = {s["id"]: s for s in json.loads((report / "report.json").read_text())["sections"]}
    for sid in ("entropy", "fid-steps", "table1"):
        assert sections[sid]["status"] == "populated" and sections[sid]["blocks"] > 0, sections[sid]
    rows = list(csv.DictReader((report / "results_steps.csv").open()))
    assert sorted((r["variant"], r["sampler"], r["steps"]) for r in rows) == [
        ("clean", "dpm++", "2"), ("lcm-cepu", "lcm", "2")]
    assert all(float(r["fid/fmnist-classifier"]) > 0 for r in rows)
