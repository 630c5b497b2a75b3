"""``condnoise corrupt`` end to end on real data: the acceptance run, the files it writes,
--force, and every bad input as a one-line error with exit code 2 and nothing written."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from condnoise.app.cli import main
from condnoise.data import open_source
from condnoise.data.corruption import CorruptedView
from condnoise.data.fashion_mnist import load_fashion_mnist


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["corrupt", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_acceptance_fashion_mnist_symmetric(tmp_path, capsys, fmnist):
    """Issue acceptance: 4,500 rows for the 60,000 training images, well under 10 s (timed
    in-process, after the interpreter and torch are loaded; see README, condnoise corrupt)."""
    out = tmp_path / "m"
    load_fashion_mnist.cache_clear()  # time the IDX reading too
    start = time.perf_counter()
    rc, stdout, err = _run(capsys, "fashion-mnist", "--kind", "symmetric", "--ratio", "0.075",
                           "--seed", "0", "--out", out)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert rc == 0, err
    assert elapsed < 10.0
    assert "corrupted 4,500 of 60,000" in stdout
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "original", "corrupted"] and len(rows) == 4501
    index = [int(r[0]) for r in rows[1:]]
    assert index == sorted(set(index))
    labels = fmnist[1]
    assert all(int(r[1]) == labels[int(r[0])] != int(r[2]) for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("source", "split", "kind", "ratio", "seed", "n", "n_corrupted",
                "class_counts_before", "class_counts_after", "condnoise_version"):  # fmt: skip
        assert key in summary
    assert (summary["n"], summary["n_corrupted"], summary["ratio"]) == (60000, 4500, 0.075)
    assert sum(summary["class_counts_after"].values()) == 60000
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["config"]["kind"] == "symmetric"
    assert not list(out.glob(".*.tmp"))


def test_force_overwrites_and_manifest_feeds_a_view(tmp_path, capsys):
    out = tmp_path / "d"
    assert _run(capsys, "digits", "--kind", "asymmetric", "--classes", "3,8", "--ratio",
                "0.05", "--out", out)[0] == 0  # fmt: skip
    first = (out / "manifest.csv").read_text()
    rc, _, err = _run(capsys, "digits", "--kind", "symmetric", "--ratio", "0.1", "--out", out)
    assert rc == 2 and "already exists; pass --force" in err
    assert (out / "manifest.csv").read_text() == first
    rc, stdout, _ = _run(capsys, "digits", "--kind", "symmetric", "--ratio", "0.1", "--seed", "3",
                         "--out", out, "--force")  # fmt: skip
    assert rc == 0 and "corrupted 144 of 1,438" in stdout
    view = CorruptedView(open_source("digits"), out)
    assert int((view.conditions() != open_source("digits").conditions()).sum()) == 144


def _captions(folder: Path, n: int = 30) -> Path:
    d = load_digits()
    words = "zero one two three four five six seven eight nine".split()
    (folder / "img").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(n):
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"img/{i}.png")
        lines.append(f'img/{i}.png,"a thin black handwritten {words[d.target[i]]}, sample {i}"')
    path = folder / "caps.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_caption_kinds_and_plugged_rewriter(tmp_path, capsys, monkeypatch):
    caps = _captions(tmp_path / "c")
    rc, stdout, err = _run(capsys, f"captions:{caps}", "--kind", "swap", "--ratio", "0.3",
                           "--out", tmp_path / "swap")  # fmt: skip
    assert rc == 0, err
    with open(tmp_path / "swap" / "manifest.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 9 and all(r[1] != r[2] for r in rows)
    plugin = tmp_path / "plug"
    plugin.mkdir()
    (plugin / "my_rewriter.py").write_text(
        "class Shout:\n    name = 'shout'\n"
        "    def __call__(self, caption, severity, rng):\n"
        "        return caption.upper() + '!' * severity\n"
    )
    monkeypatch.syspath_prepend(str(plugin))
    rc, _, err = _run(capsys, f"captions:{caps}", "--kind", "rewrite", "--ratio", "0.2",
                      "--rewriter", "my_rewriter:Shout", "--out", tmp_path / "rw")  # fmt: skip
    assert rc == 0, err
    summary = json.loads((tmp_path / "rw" / "summary.json").read_text())
    assert summary["params"]["rewriter"] == "shout" and summary["n_corrupted"] == 6
    assert sum(summary["params"]["severity_counts"].values()) == 6


def test_acceptance_scenes_swap_and_rewrite(tmp_path, capsys, scenes_env):
    """Issue acceptance: swap at 5% writes exactly 3,000 rows of the 60,000 scenes; every
    rewrite row differs from its original in 1-3 attributes of the record."""
    from condnoise.data.scenes import parse_caption
    from condnoise.data.scenes.captions import diff_size, record_diff

    src = open_source("scenes")
    for kind in ("swap", "rewrite"):
        out = tmp_path / kind
        rc, stdout, err = _run(capsys, "scenes", "--kind", kind, "--ratio", "0.05", "--out", out)
        assert rc == 0, err
        assert "corrupted 3,000 of 60,000 caption conditions of scenes" in stdout
        assert "changes.jsonl" in stdout
        with open(out / "manifest.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        assert len(rows) == 3000
        assert all(r[1] == src.conditions()[int(r[0])] != r[2] for r in rows)
        changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
        assert [c["index"] for c in changes] == [int(r[0]) for r in rows]
    records = src.records()
    for r, c in zip(rows, changes):
        n = diff_size(record_diff(records[int(r[0])], parse_caption(r[2])))
        assert 1 <= n <= 3 and n == c["n_changes"]
    summary = json.loads((tmp_path / "rewrite" / "summary.json").read_text())
    assert summary["params"]["rewriter"] == "attributes" and summary["sidecars"] == ["changes.jsonl"]
    rc, stdout, err = _run(capsys, "scenes", "--kind", "rewrite", "--rewriter", "paraphrase",
                           "--ratio", "0.01", "--out", tmp_path / "para")  # fmt: skip
    assert rc == 0 and "corrupted 600 of 60,000" in stdout, err
    changes = (tmp_path / "para" / "changes.jsonl").read_text().splitlines()
    assert len(changes) == 600 and all(json.loads(c)["n_changes"] == 0 for c in changes)


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    caps = _captions(tmp / "c", n=6)
    nofield = tmp / "nofield.jsonl"
    nofield.write_text('{"image": "c/img/0.png", "text": "x"}\n')
    broken = tmp / "broken" / "cls"
    broken.mkdir(parents=True)
    Image.new("L", (8, 8)).save(broken / "a.png")
    (broken.parent / "cls2").mkdir()
    Image.new("L", (8, 8), 255).save(broken.parent / "cls2" / "c.png")
    (broken / "b.png").write_bytes(b"\x89PNG garbage")
    (tmp / "empty" / "cls").mkdir(parents=True)
    return [
        (["digits", "--kind", "symmetric", "--ratio", "1.5"], "--ratio: must be a finite number in [0, 1], got 1.5"),
        (["digits", "--kind", "symmetric", "--ratio", "-0.1"], "got -0.1"),
        (["fashion-mnist", "--kind", "asymmetric", "--ratio", "0.1", "--classes", "Coat,Hat"],
         "unknown class name 'Hat'"),
        (["fashion-mnist", "--kind", "asymmetric", "--ratio", "0.01", "--classes", "Coat"],
         "at least 2 classes, got 1"),
        (["fashion-mnist", "--kind", "swap", "--ratio", "0.1"], "needs captions but fashion-mnist"),
        ([f"captions:{caps}", "--kind", "symmetric", "--ratio", "0.1"], "needs class labels"),
        ([f"captions:{nofield}", "--kind", "swap", "--ratio", "0.1"],
         "nofield.jsonl:1: missing or empty field 'caption'"),
        ([f"imagefolder:{tmp / 'broken'}", "--kind", "symmetric", "--ratio", "0.5"],
         f"cannot decode image {broken / 'b.png'}"),
        ([f"imagefolder:{tmp / 'empty'}", "--kind", "symmetric", "--ratio", "0.5"], "is empty"),
        (["fashion-mnist", "--kind", "symmetric", "--ratio", "0.1", "--data-dir", str(tmp / "no")],
         "Fashion-MNIST not found"),
        (["fashion-mnist", "--split", "val", "--kind", "symmetric", "--ratio", "0.1"],
         "unknown Fashion-MNIST split 'val'"),
        (["digits", "--kind", "rewrite", "--ratio", "0.1"], "needs captions but digits"),
        ([f"captions:{caps}", "--kind", "rewrite", "--ratio", "0.1", "--rewriter", "nope:X"],
         "cannot import rewriter 'nope:X'"),
        ([f"captions:{caps}", "--kind", "rewrite", "--ratio", "0.1", "--rewriter", "paraphrase"],
         "rewriter 'paraphrase' needs a source with attribute records (scenes)"),
        ([f"captions:{caps}", "--kind", "rewrite", "--ratio", "0.1", "--rewriter", "bogus"],
         "unknown rewriter 'bogus'"),
        (["scenes:seed=x", "--kind", "swap", "--ratio", "0.1"],
         "scenes seed must be a non-negative integer, got 'x'"),
        (["scenes", "--split", "val", "--kind", "swap", "--ratio", "0.1"],
         "unknown scenes split 'val'"),
        (["scenes", "--kind", "symmetric", "--ratio", "0.1"], "needs class labels but scenes"),
    ]  # fmt: skip


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, scenes_env):
    for k, (argv, message) in enumerate(_bad_inputs(tmp_path)):
        out = tmp_path / f"out{k}"
        rc, stdout, err = _run(capsys, *argv, "--out", out)
        assert rc == 2, (argv, stdout, err)
        assert err.startswith("condnoise: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
        assert not out.exists(), argv


def test_help_lists_defaults(capsys):
    assert main(["corrupt", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--ratio" in text and "(default: train)" in text and "--rewriter" in text
