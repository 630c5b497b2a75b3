"""Condition corruption on real labels / captions: exact counts, no self-flips, prior-matched
draws, determinism, asymmetric confinement, swap / rewrite semantics, random relabelling,
and the manifest round trip into a training view."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare
from torch.utils.data import DataLoader

from condnoise.data import open_source
from condnoise.data.corruption import (
    CorruptedView,
    Manifest,
    RandomFlipView,
    RuleRewriter,
    corrupt,
    corrupt_asymmetric,
    corrupt_rewrite,
    corrupt_swap,
    corrupt_symmetric,
    load_manifest_labels,
    relabel,
)
from condnoise.data.fashion_mnist import CLASS_NAMES
from condnoise.errors import UserError

torch.set_num_threads(1)
UNIFORM = (0.1,) * 10


@pytest.fixture(scope="module")
def fm_captions(fmnist):
    """Real-label captions with many exact duplicates (template per class) plus unique ones."""
    _, labels = fmnist
    caps = [f"a photo of a {CLASS_NAMES[y].lower()}" for y in labels[:3000]]
    return caps + [f"a {CLASS_NAMES[y].lower()} seen from the front, item {i}"
                   for i, y in enumerate(labels[3000:4000])]  # fmt: skip


# -- symmetric ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 41, 101, 999, 60000])
@pytest.mark.parametrize("ratio", [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1.0])
def test_symmetric_exact_count_no_self_flips(fmnist, n, ratio):
    labels = fmnist[1][:n]
    idx, orig, new = corrupt_symmetric(labels, UNIFORM, ratio, seed=n)
    assert len(idx) == round(ratio * n)
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(orig, labels[idx])
    assert np.all(new != orig) and np.all((new >= 0) & (new < 10))


def test_symmetric_new_labels_follow_the_prior(fmnist):
    images, labels = fmnist
    # An imbalanced real subset: class c keeps 300 * (c + 1) samples, so the prior is skewed.
    keep = np.concatenate([np.flatnonzero(labels == c)[: 300 * (c + 1)] for c in range(10)])
    y = labels[keep]
    prior = np.bincount(y, minlength=10) / len(y)
    idx, orig, new = corrupt_symmetric(y, prior, 0.6, seed=0)
    observed = np.bincount(new, minlength=10)
    # For true class t, new label c != t has probability prior[c] / (1 - prior[t]).
    per_true = np.bincount(orig, minlength=10)
    expected = np.array(
        [sum(per_true[t] * prior[c] / (1 - prior[t]) for t in range(10) if t != c) for c in range(10)]
    )
    assert chisquare(observed, expected).pvalue > 1e-3
    # The test has power: the naive uniform expectation is firmly rejected.
    assert chisquare(observed, np.full(10, observed.sum() / 10)).pvalue < 1e-6
    # Per true class, the conditional distribution also matches (pooled chi-square).
    for t in (0, 9):
        sel = new[orig == t]
        p = np.where(np.arange(10) == t, 0.0, prior) / (1 - prior[t])
        obs = np.bincount(sel, minlength=10)[np.arange(10) != t]
        assert chisquare(obs, len(sel) * p[np.arange(10) != t]).pvalue > 1e-3


def test_same_seed_same_manifest_other_seed_differs():
    src = open_source("digits", "all")
    a, b, c = (corrupt(src, "symmetric", 0.1, s) for s in (7, 7, 8))
    assert a.csv_text() == b.csv_text()
    assert a.csv_text() != c.csv_text()
    assert a.n_corrupted == c.n_corrupted == 180


# -- asymmetric ---------------------------------------------------------------------------
def test_asymmetric_is_confined_to_the_subset(fmnist):
    src = open_source("fashion-mnist")
    m = corrupt(src, "asymmetric", 0.075, seed=1)  # default subset
    subset = {0, 2, 4, 6}
    assert m.params["classes"] == ["T-shirt/top", "Pullover", "Coat", "Shirt"]
    assert m.n_corrupted == 4500
    assert set(m.original.tolist()) == subset and set(m.corrupted.tolist()) == subset
    assert np.all(m.original != m.corrupted)
    after = m.apply(src.conditions())
    outside = ~np.isin(fmnist[1], list(subset))
    assert np.array_equal(after[outside], fmnist[1][outside])
    digits = open_source("digits")
    m2 = corrupt(digits, "asymmetric", 0.05, seed=0, classes=["3", "8"])
    assert set(zip(m2.original.tolist(), m2.corrupted.tolist())) <= {(3, 8), (8, 3)}
    assert m2.n_corrupted == round(0.05 * len(digits))


@pytest.mark.parametrize("n", [4, 9, 33, 500])
def test_asymmetric_exact_counts_and_cap(fmnist, n):
    labels = fmnist[1][:n]
    members = int(np.isin(labels, [0, 2]).sum())
    for ratio in (0.0, 0.1, members / n):
        idx, orig, new = corrupt_asymmetric(labels, UNIFORM, ratio, 0, [0, 2])
        assert len(idx) == round(ratio * n) and np.all(orig != new)
    with pytest.raises(UserError, match=f"class subset holds only {members}"):
        corrupt_asymmetric(labels, UNIFORM, min(1.0, (members + 1) / n + 1e-9), 0, [0, 2])


def test_asymmetric_bad_class_lists():
    src = open_source("digits")
    with pytest.raises(UserError, match="unknown class name 'eleven'"):
        corrupt(src, "asymmetric", 0.1, 0, classes=["1", "eleven"])
    with pytest.raises(UserError, match="at least 2 classes, got 1"):
        corrupt(src, "asymmetric", 0.1, 0, classes=["1", "1"])
    with pytest.raises(UserError, match="needs --classes"):
        corrupt(src, "asymmetric", 0.1, 0)


# -- swap ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.00025, 0.0005, 0.00075, 0.025, 0.075, 0.2, 1.0])
def test_swap_every_counted_sample_carries_a_foreign_caption(fm_captions, ratio):
    n = len(fm_captions)
    idx, orig, new = corrupt_swap(fm_captions, ratio, seed=5)
    k = round(ratio * n)
    assert len(idx) == k and len(set(idx.tolist())) == k
    assert orig == [fm_captions[i] for i in idx]
    assert all(a != b for a, b in zip(orig, new))
    if k >= 2:  # captions are exchanged: the same multiset, moved between samples
        assert sorted(orig) == sorted(new)


def test_swap_impossible_cases_are_user_errors():
    with pytest.raises(UserError, match="too many identical captions"):
        corrupt_swap(["same"] * 9 + ["other"], 0.4, 0)
    with pytest.raises(UserError, match="3 pairwise different captions"):
        corrupt_swap(["a", "a", "b", "b"], 0.75, 0)
    idx, orig, new = corrupt_swap(["a", "a", "a", "b"], 0.5, 0)  # one pair possible
    assert len(idx) == 2 and sorted(orig) == sorted(new) == ["a", "b"]


# -- rewrite ------------------------------------------------------------------------------
def test_rewrite_changes_exactly_k_captions(fm_captions):
    idx, orig, new, sev = corrupt_rewrite(fm_captions, 0.1, seed=2)
    assert len(idx) == 400 and len(new) == 400
    assert all(a != b for a, b in zip(orig, new))
    assert set(sev.tolist()) == {1, 2, 3, 4, 5}
    again = corrupt_rewrite(fm_captions, 0.1, seed=2)
    assert again[2] == new and np.array_equal(again[0], idx)
    # Replacement words come from the dataset's own vocabulary.
    words = re.compile(r"[a-z][a-z'-]*")
    vocab = {w for c in fm_captions for w in words.findall(c)}
    assert all(set(words.findall(c)) <= vocab for c in new)


def test_rule_rewriter_severity_scales_the_damage():
    caps = ["a red wooden chair beside a small blue table in a bright kitchen",
            "two black dogs running on green grass", "an old man reading a thick book"]  # fmt: skip
    rw = RuleRewriter(caps)
    rng = np.random.default_rng(0)

    def changed(sev):
        a, b = caps[0].split(), rw(caps[0], sev, rng).split()
        return sum(x != y for x, y in zip(a, b))

    low = np.mean([changed(1) for _ in range(20)])
    high = np.mean([changed(5) for _ in range(20)])
    assert 1 <= low < high
    assert rw("a the of", 3, rng) != "a the of"  # nothing to swap: an attribute is inserted


def test_pluggable_rewriter_and_its_guarantee(fm_captions):
    def night(caption, severity, rng):
        return caption + " at night" * severity

    src_caps = fm_captions[:100]
    idx, orig, new, sev = corrupt_rewrite(src_caps, 0.2, 0, night)
    assert all(b == a + " at night" * s for a, b, s in zip(orig, new, sev.tolist()))
    with pytest.raises(UserError, match="left caption .* unchanged"):
        corrupt_rewrite(src_caps, 0.2, 0, lambda c, s, r: c)


# -- kind / source mismatches -------------------------------------------------------------
def test_kind_must_fit_the_condition_type(tmp_path):
    src = open_source("digits")
    with pytest.raises(UserError, match="kind 'swap' needs captions but digits"):
        corrupt(src, "swap", 0.1, 0)
    with pytest.raises(UserError, match="ratio must lie in"):
        corrupt(src, "symmetric", 1.5, 0)
    with pytest.raises(UserError, match="has no manifest"):
        corrupt(src, "random", 0.1, 0)


# -- manifest round trip ------------------------------------------------------------------
def test_manifest_round_trip_into_training_view(tmp_path):
    src = open_source("digits", "train", image_size=16)
    m = corrupt(src, "symmetric", 0.075, seed=4)
    m.save(tmp_path / "m", src.conditions())
    loaded = Manifest.load(tmp_path / "m")
    assert loaded.csv_text() == m.csv_text() and loaded.kind == "symmetric"
    view = CorruptedView(src, tmp_path / "m")
    clean = src.conditions()
    changed = np.flatnonzero(view.conditions() != clean)
    assert np.array_equal(changed, m.index)
    images, labels = view.tensors()
    assert images is src.tensors()[0]  # images are never copied
    assert np.array_equal(labels.numpy(), view.conditions())
    i = int(m.index[0])
    assert view[i][1] == int(m.corrupted[0]) and torch.equal(view[i][0], src[i][0])
    assert np.array_equal(load_manifest_labels(tmp_path / "m", src), view.conditions())
    assert np.isclose(sum(view.meta.class_prior), 1.0)
    with pytest.raises(UserError, match="already exists; pass --force"):
        m.save(tmp_path / "m", src.conditions())
    with pytest.raises(UserError, match="made for split 'train', not 'test'"):
        load_manifest_labels(tmp_path / "m", open_source("digits", "test"))
    with pytest.raises(UserError, match="made for source 'digits', not 'fashion-mnist'"):
        CorruptedView(open_source("fashion-mnist"), tmp_path / "m")


def test_manifest_detects_a_source_with_other_labels(tmp_path):
    src = open_source("digits", "all")
    m = corrupt(src, "symmetric", 0.1, 0)
    m.original = m.original.copy()
    m.original[0] = (m.original[0] + 1) % 10
    m.corrupted = np.where(m.corrupted == m.original, (m.corrupted + 1) % 10, m.corrupted)
    m.save(tmp_path, src.conditions())
    with pytest.raises(UserError, match=f"row for index {m.index[0]} says original"):
        CorruptedView(src, tmp_path)


def test_caption_manifest_quotes_survive(tmp_path):
    caps = ['he said "hi", then left', "line one\nline two", "plain", "a, b, c", "x"] * 4
    from condnoise.data.manifest import Manifest as M

    idx, orig, new = corrupt_swap(caps, 0.5, 0)
    m = M("captions:/x", "train", "swap", 0.5, 0, len(caps), "caption", idx, orig, new)
    m.save(tmp_path, caps)
    text = (tmp_path / "manifest.csv").read_text()
    assert text.startswith("index,original,corrupted\n") and '"he said ""hi"", then left"' in text
    back = M.load(tmp_path)
    assert back.corrupted == new and back.original == orig
    assert np.array_equal(back.index, idx)


# -- random corruption (appendix E.4) -----------------------------------------------------
def test_relabel_rate_no_self_and_pure_function(fmnist):
    labels = torch.from_numpy(fmnist[1].copy())
    index = torch.arange(len(labels))
    out = relabel(labels, index, 3, class_prior=UNIFORM, ratio=0.1, seed=0)
    flipped = out != labels
    assert binomtest(int(flipped.sum()), len(labels), 0.1).pvalue > 1e-3
    # Batch composition and order do not matter: a permuted sub-batch gives the same draws.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:5000]
    sub = relabel(labels[perm], index[perm], 3, class_prior=UNIFORM, ratio=0.1, seed=0)
    assert torch.equal(sub, out[perm])
    other_step = relabel(labels, index, 4, class_prior=UNIFORM, ratio=0.1, seed=0)
    other_seed = relabel(labels, index, 3, class_prior=UNIFORM, ratio=0.1, seed=1)
    assert not torch.equal(other_step, out) and not torch.equal(other_seed, out)
    # New labels over all flips follow the (uniform) prior among the other classes.
    counts = torch.bincount(out[flipped], minlength=10).numpy()
    assert chisquare(counts).pvalue > 1e-3
    assert torch.equal(relabel(labels, index, 3, class_prior=UNIFORM, ratio=0.0, seed=0), labels)
    assert torch.all(relabel(labels, index, 3, class_prior=UNIFORM, ratio=1.0, seed=0) != labels)


def test_random_flip_view_independent_of_workers():
    src = open_source("digits", "train")
    view = RandomFlipView(src, ratio=0.2, seed=11)
    view.set_epoch(2)
    single = [int(y) for _, yb in DataLoader(view, batch_size=64) for y in yb]
    multi = [int(y) for _, yb in DataLoader(view, batch_size=64, num_workers=2) for y in yb]
    assert single == multi == view.conditions().tolist()
    assert single == view.tensors()[1].tolist()
    frac = np.mean(np.array(single) != src.conditions())
    assert 0.15 < frac < 0.25
    view.set_epoch(3)
    assert view.conditions().tolist() != single


# -- scenes: attribute-exact caption corruption -------------------------------------------
FIELDS = ("class", "colour", "size", "position")


def _attribute_difference(a: dict, b: dict) -> int:
    """Fewest differing (item, field) pairs + background, over all item matchings
    (independent of condnoise's record_diff; equal item counts)."""
    from itertools import permutations

    assert a["count"] == b["count"]
    best = min(sum(x[f] != y[f] for x, y in zip(a["items"], [b["items"][j] for j in perm])
                   for f in FIELDS) for perm in permutations(range(b["count"])))  # fmt: skip
    return best + (a["background"] != b["background"])


@pytest.fixture(scope="module")
def scenes_slice():
    from condnoise.data.scenes import Scenes

    return Scenes("train", num_samples=3000)


def _changes(m) -> list[dict]:
    import json

    return [json.loads(line) for line in m.sidecars["changes.jsonl"].splitlines()]


def test_scenes_rewrite_changes_one_to_three_attributes(scenes_slice, tmp_path):
    from condnoise.data.scenes import HELD_OUT, parse_caption
    from condnoise.data.scenes.rewrite import CHANGES_BY_SEVERITY
    from condnoise.data.scenes.vocab import is_valid_layout

    m = corrupt(scenes_slice, "rewrite", 0.1, seed=5)
    assert m.n_corrupted == 300 and m.params["rewriter"] == "attributes"
    records = scenes_slice.records()
    rows = _changes(m)
    assert [r["index"] for r in rows] == m.index.tolist()
    for j, (i, new, row) in enumerate(zip(m.index.tolist(), m.corrupted, rows)):
        assert m.original[j] == scenes_slice.conditions()[i] and new != m.original[j]
        rec = parse_caption(new)
        d = _attribute_difference(records[i], rec)
        assert 1 <= d <= 3 and d == row["n_changes"] == CHANGES_BY_SEVERITY[row["severity"]]
        assert rec == row["record"] and len(row["changes"]) == d
        assert is_valid_layout([(it["position"], it["size"]) for it in rec["items"]])
        assert not {(it["class_name"], it["colour"]) for it in rec["items"]} & set(HELD_OUT)
    counts = m.params["attribute_changes"]
    assert set(counts) == {"1", "2", "3"} and sum(counts.values()) == 300
    changed = {c["attribute"] for r in rows for c in r["changes"]}
    assert changed == {"class", "colour", "size", "position", "background"}
    again = corrupt(scenes_slice, "rewrite", 0.1, seed=5)
    assert again.corrupted == m.corrupted and again.sidecars == m.sidecars
    m.save(tmp_path, scenes_slice.conditions())
    assert (tmp_path / "changes.jsonl").read_text() == m.sidecars["changes.jsonl"]
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sidecars"] == ["changes.jsonl"] and summary["params"]["attribute_changes"]
    # a later manifest without sidecars in the same folder removes the stale one
    digits = open_source("digits")
    corrupt(digits, "symmetric", 0.1, 0).save(tmp_path, digits.conditions(), force=True)
    assert not (tmp_path / "changes.jsonl").exists()


def test_scenes_paraphrase_changes_no_attribute(scenes_slice):
    from condnoise.data.scenes import parse_caption

    m = corrupt(scenes_slice, "rewrite", 0.05, seed=1, rewriter="paraphrase")
    assert m.n_corrupted == 150 and m.params["rewriter"] == "paraphrase"
    records = scenes_slice.records()
    for i, old, new in zip(m.index.tolist(), m.original, m.corrupted):
        assert new != old and parse_caption(new) == records[i]
    assert {r["n_changes"] for r in _changes(m)} == {0}
    assert m.params["attribute_changes"] == {"0": 150}


def test_scenes_swap_and_the_view(scenes_slice):
    m = corrupt(scenes_slice, "swap", 0.05, seed=2)
    assert m.n_corrupted == 150 and all(a != b for a, b in zip(m.original, m.corrupted))
    rows = _changes(m)
    assert all(r["severity"] is None and r["n_changes"] is not None for r in rows)
    assert np.mean([r["n_changes"] > 0 for r in rows]) > 0.95
    view = CorruptedView(scenes_slice, m)
    images, index = view.tensors()
    assert images is scenes_slice.tensors()[0] and torch.equal(index, torch.arange(3000))
    i = int(m.index[0])
    assert view.conditions()[i] == m.corrupted[0] == view[i][1]


def test_rewriter_names_are_checked(scenes_slice, tmp_path):
    from PIL import Image

    with pytest.raises(UserError, match="unknown rewriter 'bogus'; built-in: rule, attributes"):
        corrupt(scenes_slice, "rewrite", 0.01, 0, rewriter="bogus")
    lines = ["image,caption"]
    for i in range(10):
        Image.new("L", (8, 8), 20 * i).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,a gray square number {i}")
    (tmp_path / "caps.csv").write_text("\n".join(lines) + "\n")
    src = open_source(f"captions:{tmp_path / 'caps.csv'}")
    with pytest.raises(UserError, match="rewriter 'paraphrase' needs a source with attribute"):
        corrupt(src, "rewrite", 0.1, 0, rewriter="paraphrase")
    assert corrupt(scenes_slice, "rewrite", 0.01, 0, rewriter="rule").params["rewriter"] == "rule"
