"""Text-image evaluation on real ``scenes`` renders: the recognizer's targets and accuracy by
hand, the all-pairs training renders, small versions of scenes-recognizer / scenes-clip
trained once per session (tmp cache), ``condnoise evaluate`` with caption-accuracy,
clip-score and r-precision on folders of real, shuffled and random images, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condnoise.app.cli import main
from condnoise.data.scenes import HELD_OUT, Scenes, parse_caption
from condnoise.evaluation import recognizer as R

N = 400  # samples per evaluated folder


def test_targets_from_layout_records_and_captions_agree():
    ds = Scenes("test-novel", num_samples=300)
    a = R.layout_targets(ds.layout)
    b = R.record_targets(ds.records())
    c = R.record_targets([parse_caption(t) for t in ds.conditions()])
    for key in a:
        assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], c[key]), key
    assert set(np.unique(a["count"])) == {0, 1, 2}
    assert ((a["class"] >= 0) == (a["present"] == 1)).all()


def test_attribute_accuracy_by_hand():
    # two scenes; scene 0 wants items at positions 0 and 2, scene 1 one item at position 4
    t = {"present": np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]]),
         "class": np.array([[3, -1, 5, -1, -1], [-1, -1, -1, -1, 7]]),
         "colour": np.array([[1, -1, 2, -1, -1], [-1, -1, -1, -1, 0]]),
         "size": np.array([[0, -1, 0, -1, -1], [-1, -1, -1, -1, 1]]),
         "background": np.array([0, 2]), "count": np.array([1, 0])}  # fmt: skip
    p = {k: v.copy() for k, v in t.items()}
    assert R.attribute_accuracy(p, t) == {k: 1.0 for k in R.ATTRIBUTES}
    p["class"][0, 2] = 4  # one wrong class of three items
    p["present"][1, 4], p["class"][1, 4], p["colour"][1, 4], p["size"][1, 4] = 0, -1, -1, -1
    p["background"][1] = 3
    acc = R.attribute_accuracy(p, t)
    assert acc["class"] == pytest.approx(1 / 3)  # item 3 missing counts wrong too
    assert acc["colour"] == acc["size"] == acc["position"] == pytest.approx(2 / 3)
    assert acc["background"] == 0.5 and acc["count"] == 1.0 and acc["all"] == 0.0
    p = {k: v.copy() for k, v in t.items()}
    p["present"][0, 1] = 1  # an extra item: only 'all' notices
    assert R.attribute_accuracy(p, t)["all"] == 0.5


def test_eval_train_scenes_use_train_items_and_every_pair():
    from condnoise.data.scenes.dataset import eval_train_scenes
    from condnoise.data.scenes.render import item_pool
    from condnoise.data.scenes.vocab import CLASSES, COLOURS

    a = eval_train_scenes(3000)
    assert np.array_equal(a.images[:500], eval_train_scenes(500).images)  # prefix-stable
    m = a.layout.position >= 0
    pairs = {(CLASSES[c], COLOURS[k]) for c, k in zip(a.layout.cls[m], a.layout.colour[m])}
    assert pairs == {(c, k) for c in CLASSES for k in COLOURS}  # all 80, held-out ones too
    assert set(HELD_OUT) <= pairs
    assert np.isin(a.layout.source[m], item_pool("train")).all()  # Fashion-MNIST train items
    assert a.captions[0] != Scenes("train", num_samples=1).conditions()[0]  # its own stream


def test_scenes_clip_tokens_are_the_text_models_tokens():
    from condnoise.conditioning.text import build_text_encoder
    from condnoise.evaluation import scenes_clip as C

    caps = Scenes("test", num_samples=50).conditions()
    text_model = build_text_encoder("bert-embed", max_length=C.MAX_TOKENS, dim=8, heads=2)
    tower = C.ScenesCLIP().text
    ids = tower.tokenize(caps)
    assert ids.shape == (50, C.MAX_TOKENS) and ids.dtype == torch.int64
    assert torch.equal(ids, text_model.tokenize(caps))
    assert torch.equal(tower.encoder.mask_of(ids), text_model.mask_of(ids))
    assert tower(ids).shape == (50, C.EMBED_DIM)


# -- with the session's small networks ---------------------------------------------------
@pytest.fixture
def text_env(monkeypatch, text_eval_cache):
    monkeypatch.setenv("CONDNOISE_CACHE", str(text_eval_cache))
    return text_eval_cache


def test_recognizer_card_real_renders_high_shuffled_and_random_near_chance(text_env):
    card = json.loads((text_env / "scenes-recognizer.json").read_text())
    acc = card["accuracy"]
    for split in ("test", "test-novel"):  # real renders, held-out pairs included
        assert acc[split]["all"] > 0.3, acc
        assert min(acc[split][k] for k in ("colour", "size", "position", "background")) > 0.9
    for chance in ("random", "test-shuffled"):
        assert acc[chance]["all"] < 0.05, acc
        assert acc[chance]["class"] < 0.3 and acc[chance]["colour"] < 0.3
    assert card["train_cpu_seconds"] > 0 and len(card["sha256"]) == 64


def _folder(root: Path, name: str, images: np.ndarray, *, npz: dict | None = None,
            meta: dict | None = None) -> Path:  # fmt: skip
    folder = root / name
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", images=images, **(npz or {}))
    (folder / "meta.json").write_text(json.dumps({"guidance": 1.0, **(meta or {})}))
    return folder


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory, text_eval_cache):
    """real: test renders with their captions (in samples.npz); novel: test-novel renders
    named by source_split + source_indices; shuffled: test renders with the next scene's
    caption; random: uniform noise with the test captions; repeat: 2 prompts x 3 samples."""
    import os

    old = os.environ.get("CONDNOISE_CACHE")
    os.environ["CONDNOISE_CACHE"] = str(text_eval_cache)
    try:
        test, novel = Scenes("test"), Scenes("test-novel")
        imgs, caps = np.array(test.images_uint8()[:N]), test.conditions()[:N]
        novel_imgs = np.array(novel.images_uint8()[:N])
    finally:
        os.environ.pop("CONDNOISE_CACHE") if old is None else os.environ.update(CONDNOISE_CACHE=old)
    root = tmp_path_factory.mktemp("text-samples")
    _folder(root, "real", imgs, npz={"captions": np.array(caps)})
    _folder(root, "novel", novel_imgs,
            meta={"source_split": "test-novel", "source_indices": list(range(N))})
    _folder(root, "shuffled", imgs, meta={"captions": caps[1:] + caps[:1]})
    noise = np.random.default_rng(0).integers(0, 256, imgs.shape, dtype=np.uint8)
    _folder(root, "random", noise, meta={"captions": caps})
    _folder(root, "repeat", imgs[[0, 0, 0, 1, 1, 1]],
            npz={"labels": np.array([0, 0, 0, 1, 1, 1])}, meta={"captions": caps[:2]})
    return root


def test_evaluate_caption_accuracy_clip_score_r_precision(text_env, text_folders, capsys):
    args = ["--ref", "scenes:test", "--features", "scenes-clip", "--max-ref", "2000",
            "--metrics", "caption-accuracy,clip-score,r-precision,fid,pr"]  # fmt: skip
    assert main(["evaluate", *[str(text_folders / n) for n in
                               ("real", "novel", "shuffled", "random")], *args]) == 0
    res = {n: json.loads((text_folders / n / "metrics.json").read_text())["metrics"]
           for n in ("real", "novel", "shuffled", "random")}  # fmt: skip
    real, novel, shuffled, noise = (res[n] for n in ("real", "novel", "shuffled", "random"))
    rec, clip = "scenes-recognizer", "scenes-clip"
    for m in (real, novel):
        assert m["caption_all"][rec] > 0.3 and m["caption_colour"][rec] > 0.9
    assert "caption_all_seen" in real and "caption_all_novel" not in real
    assert "caption_all_novel" in novel and "caption_all_seen" not in novel
    assert novel["caption_all"][rec] == novel["caption_all_novel"][rec]
    for m in (shuffled, noise):
        assert m["caption_all"][rec] < 0.05 and m["caption_class"][rec] < 0.3
    assert real["clip_score"][clip] > shuffled["clip_score"][clip] + 10
    assert real["r_precision"][clip] > 0.3 > 0.1 > shuffled["r_precision"][clip]
    assert noise["r_precision"][clip] < 0.1
    assert real["fid"][clip] < shuffled["fid"][clip] + 1e-6 < noise["fid"][clip]
    out = capsys.readouterr().out
    assert "caption_all@scenes-recognizer" in out and "r_precision@scenes-clip" in out
    details = json.loads((text_folders / "real" / "metrics.json").read_text())["details"]
    assert set(details["caption_ceiling"][rec]) == {"test", "test-novel", "test-shuffled", "random"}
    assert details["caption_prompts"][rec] == {"seen": N, "novel": 0}


def test_labels_index_a_shorter_prompt_list(text_env, text_folders):
    assert main(["evaluate", str(text_folders / "repeat"), "--ref", "scenes:test",
                 "--features", "scenes-clip", "--metrics", "caption-accuracy"]) == 0
    m = json.loads((text_folders / "repeat" / "metrics.json").read_text())["metrics"]
    assert m["caption_all"]["scenes-recognizer"] in (0.0, 0.5, 1.0)
    assert set(m) == {f"caption_{a}{s}" for a in R.ATTRIBUTES for s in ("", "_seen")}


@pytest.mark.parametrize(
    ("npz", "meta", "metrics", "message"),
    [
        ({"labels": np.zeros(4, np.int64)}, {}, "clip-score", "need the prompts"),
        ({}, {}, "fid", "missing array(s) ['labels'] (or the prompts"),
        ({}, {"captions": ["a small red bag on the left", "a purple zebra"] * 2}, "caption-accuracy",
         "prompt 1: cannot parse caption 'a purple zebra'"),
        ({}, {"source_split": "test"}, "caption-accuracy", "must be given together"),
        ({}, {"source_split": "test", "source_indices": [0, 1, 2, 10**6]}, "caption-accuracy",
         "source_indices outside 0..9999"),
        ({}, {"captions": ["a small red bag on the left"] * 3}, "caption-accuracy",
         "3 prompts for 4 samples"),
        ({}, {"captions": ["a small red bag on the left"] * 4}, "rmd", "need the requested class"),
        ({}, {"captions": ["a small red bag on the left"] * 4}, "clip-score",
         "need a text-image extractor"),
    ],
)
def test_bad_text_inputs_are_one_line(tmp_path, scenes_env, capsys, npz, meta, metrics, message):
    from condnoise.evaluation.features import register_extractor

    register_extractor("tiny-image-only-net", lambda: torch.nn.Flatten())  # no text tower
    folder = _folder(tmp_path, "s1", np.zeros((4, 32, 32, 3), np.uint8), npz=npz, meta=meta)
    rc = main(["evaluate", str(folder), "--ref", "scenes:test", "--metrics", metrics,
               "--features", "tiny-image-only-net"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_extractor(tmp_path, scenes_env, capsys):
    folder = _folder(tmp_path, "s1", np.zeros((4, 32, 32, 3), np.uint8),
                     meta={"captions": ["a small red bag on the left"] * 4})
    for features, message in (("no-such-net", "unknown feature extractor 'no-such-net'"),
                              (f"clip:{tmp_path / 'missing'}", "does not exist")):  # fmt: skip
        assert main(["evaluate", str(folder), "--ref", "scenes:test", "--features", features]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_r_precision_needs_a_captioned_reference(tmp_path, text_env, capsys):
    folder = _folder(tmp_path, "s1", np.zeros((4, 32, 32, 3), np.uint8),
                     meta={"captions": ["a small red bag on the left"] * 4})
    rc = main(["evaluate", str(folder), "--ref", "fashion-mnist:test", "--features", "scenes-clip",
               "--metrics", "r-precision"])
    assert rc == 2 and "has no captions" in capsys.readouterr().err


def test_features_train_help_and_list(capsys):
    assert main(["features", "train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{fmnist-classifier,scenes-recognizer,scenes-clip}" in text
    from condnoise.evaluation import scenes_clip as C

    assert f"scenes-recognizer {R.EPOCHS}" in text and f"scenes-clip {C.EPOCHS})" in text
    assert f"scenes-recognizer {R.NUM_TRAIN}" in text and f"scenes-clip {C.NUM_TRAIN})" in text
    assert "(default: fmnist-classifier)" in text
    assert main(["features", "list"]) == 0
    assert {"scenes-clip", "clip:PATH"} <= set(capsys.readouterr().out.split())
    assert main(["evaluate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "caption-accuracy" in text and "clip:PATH" in text and "r-precision" in text
