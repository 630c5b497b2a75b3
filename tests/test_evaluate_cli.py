"""`condnoise evaluate` / `condnoise features` end to end on real Fashion-MNIST sample folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condnoise.app.cli import main

pytestmark = pytest.mark.usefixtures("eval_env")




def _write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, scale: float) -> None:
    """The format `condnoise sample` writes: samples.npz (uint8 NHWC, int64) + meta.json."""
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", images=images, labels=labels.astype(np.int64))
    (folder / "meta.json").write_text(json.dumps({"guidance": scale, "num": len(images)}))


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    """s1.0: real train images padded to 32x32 with their true labels; s2.0: the same
    images asked for the wrong classes; s3.0: heavily noised images."""
    from condnoise.data.fashion_mnist import load_fashion_mnist

    train, labels = load_fashion_mnist("train")
    n = 600
    imgs = np.pad(train[:n, ..., None], ((0, 0), (2, 2), (2, 2), (0, 0)))
    root = tmp_path_factory.mktemp("samples")
    _write_folder(root / "s1.0", imgs, labels[:n], 1.0)
    _write_folder(root / "s2.0", imgs, (labels[:n] + 3) % 10, 2.0)
    noisy = np.clip(imgs + np.random.default_rng(0).normal(0, 60, imgs.shape), 0, 255)
    _write_folder(root / "s3.0", noisy.astype(np.uint8), labels[:n], 3.0)
    return root


def test_evaluate_many_folders(sample_root, tmp_path, capsys):
    out = tmp_path / "all.json"
    rc = main(["evaluate", str(sample_root), "--ref", "fashion-mnist:test", "--max-ref", "2000",
               "--metrics", "fid,pr,dc,is,condition-accuracy,rmd,knn-l2,memorization",
               "--max-train", "3000", "--out", str(out)])
    assert rc == 0
    res = {p.parent.name: json.loads((p).read_text()) for p in sample_root.glob("*/metrics.json")}
    assert sorted(res) == ["s1.0", "s2.0", "s3.0"]
    clean, wrong, noisy = res["s1.0"], res["s2.0"], res["s3.0"]
    assert clean["schema"] == "condnoise.metrics/1"
    assert clean["sample_shape"] == [32, 32, 1] and clean["evaluated_shape"] == [28, 28, 1]
    assert clean["sample_meta"]["guidance"] == 1.0
    m = clean["metrics"]
    name = "fmnist-classifier"
    assert set(m) >= {"fid", "precision", "recall", "density", "coverage", "is", "is_std",
                      "condition_accuracy", "rmd_top1", "avg_top5_l2", "memorization_ratio"}
    assert all(set(v) == {name} for v in m.values())
    # real images asked for their own classes: high condition accuracy; wrong labels: low
    assert m["condition_accuracy"][name] >= 0.85
    assert wrong["metrics"]["condition_accuracy"][name] <= 0.1
    # same images: label-free metrics agree between s1.0 and s2.0
    assert wrong["metrics"]["fid"][name] == pytest.approx(m["fid"][name])
    # noise hurts FID and precision
    assert noisy["metrics"]["fid"][name] > 3 * m["fid"][name]
    assert noisy["metrics"]["precision"][name] < m["precision"][name]
    # images taken from the train split itself are memorised by construction
    assert m["memorization_ratio"][name] == pytest.approx(1.0)
    assert m["avg_top5_l2"][name] < noisy["metrics"]["avg_top5_l2"][name]
    assert clean["details"]["memorization_threshold"][name] > 0
    assert clean["provenance"]["config"]["ref"] == "fashion-mnist:test"
    assert "torch" in clean["provenance"]["versions"]
    combined = json.loads(out.read_text())
    assert len(combined["results"]) == 3
    printed = capsys.readouterr().out
    assert "condition_accuracy@fmnist-classifier" in printed
    # the sweep table (printed and beside --out) has one row per folder, by guidance scale
    table = out.with_suffix(".md").read_text()
    assert table in printed
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| s1.0", "| s2.0", "| s3.0"]
    header = table.splitlines()[0].split(" | ")
    col = header.index("condition_accuracy@fmnist-classifier")
    assert float(rows[0][col]) == pytest.approx(m["condition_accuracy"][name], abs=1e-4)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "fid,bogus"], "unknown metric(s) bogus"),
        (["--features", "clip-nope"], "unknown feature extractor 'clip-nope'"),
        (["--metrics", "is", "--features", "tiny-test-net-cli"], "need a classifier extractor"),
    ],
)
def test_evaluate_bad_options(sample_root, capsys, args, message):
    from condnoise.evaluation.features import register_extractor

    register_extractor("tiny-test-net-cli", lambda: torch.nn.Flatten())
    rc = main(["evaluate", str(sample_root / "s1.0"), "--max-ref", "500", *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_evaluate_bad_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty)]) == 2
    assert "no samples.npz" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["evaluate", str(run)]) == 2
    assert "training run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad" / "s1.0"
    bad.mkdir(parents=True)
    np.savez(bad / "samples.npz", images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.zeros(3))
    assert main(["evaluate", str(bad)]) == 2
    assert "labels of shape (3,)" in capsys.readouterr().err
    np.savez(bad / "samples.npz", images=np.zeros((4, 28, 28, 1), np.float32), labels=np.zeros(4))
    assert main(["evaluate", str(bad)]) == 2
    assert "expected uint8" in capsys.readouterr().err
    (bad / "samples.npz").write_bytes(b"not an npz")
    assert main(["evaluate", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_evaluate_few_samples_needs_shrinkage(sample_root, tmp_path, capsys):
    from condnoise.data.fashion_mnist import load_fashion_mnist

    train, labels = load_fashion_mnist("train")
    folder = tmp_path / "few"
    _write_folder(folder, train[:50, ..., None], labels[:50], 1.0)
    assert main(["evaluate", str(folder), "--max-ref", "500", "--metrics", "fid"]) == 2
    assert "--shrinkage" in capsys.readouterr().err
    assert main(["evaluate", str(folder), "--max-ref", "500", "--metrics", "fid",
                 "--shrinkage", "0.05"]) == 0
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["fid"]["fmnist-classifier"] > 0


def test_evaluate_merges_successive_calls(sample_root, tmp_path, capsys):
    """A second call on the same samples and settings adds its values; a change of samples
    or of a value-affecting setting replaces the file and says why."""
    from condnoise.evaluation.features import register_extractor

    register_extractor("tiny-test-net-cli", lambda: torch.nn.Flatten())
    folder = tmp_path / "s2.0"
    with np.load(sample_root / "s1.0" / "samples.npz") as z:
        _write_folder(folder, z["images"][:300], z["labels"][:300], 2.0)
    base = ["evaluate", str(folder), "--max-ref", "500"]
    path = folder / "metrics.json"
    assert main([*base, "--metrics", "fid,condition-accuracy"]) == 0
    first = json.loads(path.read_text())["metrics"]
    assert main([*base, "--metrics", "pr", "--features", "tiny-test-net-cli"]) == 0
    assert "merged with earlier values (4 kept)" in capsys.readouterr().out
    rec = json.loads(path.read_text())
    assert rec["metrics"]["fid"] == first["fid"]
    assert set(rec["metrics"]["precision"]) == {"tiny-test-net-cli"}
    assert rec["kept_from_earlier"] == ["condition_accuracy@fmnist-classifier", "fid@fmnist-classifier",
                                        "real_accuracy@fmnist-classifier",
                                        "real_accuracy_native@fmnist-classifier"]
    # recomputing a kept value takes it off the kept list
    assert main([*base, "--metrics", "fid"]) == 0
    rec = json.loads(path.read_text())
    assert rec["kept_from_earlier"] == ["condition_accuracy@fmnist-classifier",
                                        "precision@tiny-test-net-cli",
                                        "real_accuracy@fmnist-classifier",
                                        "real_accuracy_native@fmnist-classifier",
                                        "recall@tiny-test-net-cli"]
    assert rec["metrics"]["fid"]["fmnist-classifier"] == pytest.approx(first["fid"]["fmnist-classifier"])
    capsys.readouterr()
    # another reference size: the old values are not comparable, so they go
    assert main(["evaluate", str(folder), "--max-ref", "400", "--metrics", "fid"]) == 0
    assert "replaced earlier metrics.json (max_ref 500 -> 400)" in capsys.readouterr().out
    assert set(json.loads(path.read_text())["metrics"]) == {"fid"}
    # other samples in the folder
    with np.load(sample_root / "s3.0" / "samples.npz") as z:
        np.savez(folder / "samples.npz", images=z["images"][:300], labels=z["labels"][:300])
    assert main(["evaluate", str(folder), "--max-ref", "400", "--metrics", "pr"]) == 0
    assert "samples.npz changed" in capsys.readouterr().out
    assert set(json.loads(path.read_text())["metrics"]) == {"precision", "recall"}
    assert main(["evaluate", str(folder), "--max-ref", "400", "--metrics", "fid", "--replace"]) == 0
    assert "(--replace)" in capsys.readouterr().out
    assert set(json.loads(path.read_text())["metrics"]) == {"fid"}
    assert main(["evaluate", str(folder), "--max-ref", "400", "--out", str(tmp_path / "t.md")]) == 2
    assert "--out" in capsys.readouterr().err


def test_features_list_and_help(capsys):
    assert main(["features", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"inception", "inception-spatial", "fmnist-classifier"} <= set(listed)
    assert main(["evaluate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "reference data DATA[:split]" in help_text and "mnist:test)" in help_text


def test_sweep_summary_reads_scale_from_meta_or_folder_name():
    from condnoise.evaluation.summary import guidance_of, markdown_table, sweep_figure

    recs = [{"samples": "out/s2.5", "sample_meta": {}, "num_samples": 10,
             "metrics": {"fid": {"inception": 3.0}, "is_std": {"x": 1.0}}},
            {"samples": "out/custom", "sample_meta": {"guidance": 1.0}, "num_samples": 10,
             "metrics": {"fid": {"inception": 5.0}, "condition_accuracy": {"clf": 0.5}}},
            {"samples": "out/other", "sample_meta": {}, "num_samples": 10, "metrics": {}}]
    assert [guidance_of(r) for r in recs] == [2.5, 1.0, None]
    lines = markdown_table(recs).splitlines()
    assert lines[0] == "| folder | s | n | fid@inception | condition_accuracy@clf |"
    # ordered by scale, folders without one last; missing values left blank
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| custom", "| s2.5", "| other"]
    assert lines[3] == "| s2.5 | 2.5 | 10 | 3 |  |"
    assert sweep_figure(recs[:1]) is None
    assert sweep_figure(recs)[:4] == b"\x89PNG"


def test_evaluate_samples_returns_the_per_sample_scores_behind_its_metrics(sample_root):
    from condnoise import stats
    from condnoise.evaluation.evaluate import EvalConfig, evaluate_samples, load_samples

    cfg = EvalConfig(metrics=("rmd", "knn-l2", "memorization", "pr", "dc"), max_ref=2000,
                     max_train=3000)  # fmt: skip
    result = evaluate_samples(load_samples(sample_root / "s3.0"), cfg)
    name = "fmnist-classifier"
    m, per = result.record["metrics"], result.per_sample[name]
    assert set(per) == {"rmd", "train_l2_nearest", "train_l2_top5"}
    assert all(v.shape == (600,) for v in per.values())
    assert m["rmd_top1"][name] == pytest.approx(stats.top_fraction_mean(per["rmd"]))
    assert m["avg_top5_l2"][name] == pytest.approx(per["train_l2_top5"].mean())
    thr = result.record["details"]["memorization_threshold"][name]
    assert m["memorization_ratio"][name] == pytest.approx((per["train_l2_nearest"] < thr).mean())
    assert (per["train_l2_nearest"] <= per["train_l2_top5"]).all()
    assert set(result.score_arrays()) == {f"{k}@{name}" for k in per}
    assert {"precision", "recall", "density", "coverage"} <= set(m)
