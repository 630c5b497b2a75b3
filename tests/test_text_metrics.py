"""Text-image metrics against independent computations: CLIP score and R-precision by hand on
fixed embeddings, the distractor draw against its condnoise.rng formula, and the real-CLIP
extractor (a tiny randomly initialised transformers CLIP saved to a temp folder) against
torchmetrics' CLIPScore and a hand computation through the model's own layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from condnoise import rng
from condnoise.errors import UserError
from condnoise.evaluation import text_metrics as T

CAPTIONS = ["a red bag on the left", "two blue coats at the top and in the centre",
            "a small tee near the bottom", "a huge white sandal to the right"]  # fmt: skip


def test_clip_score_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0]])
    txt = np.array([[5.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    # cosines 1, 0, -1, 1/sqrt(2) (norms do not matter)
    np.testing.assert_allclose(T.clip_scores(img, txt), [100, 0, -100, 100 / np.sqrt(2)], atol=1e-9)
    assert T.clip_score(img, txt) == pytest.approx((100 + 0 + 0 + 100 / np.sqrt(2)) / 4)
    with pytest.raises(UserError, match="do not pair"):
        T.clip_score(img, txt[:3])
    with pytest.raises(UserError, match="finite"):
        T.clip_score(img, np.full_like(txt, np.nan))


def test_r_precision_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    true = np.array([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    # sample 0: true cos 0.995 beats distractors (0,1) and (-1,0); sample 1: its caption
    # (cos 0) loses to (0,1); sample 2: ties with an identical distractor: a miss
    pool = np.array([[0.0, 1.0], [-1.0, 0.0], [2.0, 2.0]])
    idx = np.array([[0, 1], [0, 1], [1, 2]])
    hits = T.r_precision_hits(img, true, pool[idx])
    assert hits.tolist() == [True, False, False]
    assert T.r_precision(img, true, pool, idx) == pytest.approx(1 / 3)


def test_distractor_draw_is_the_documented_rng_formula():
    pool = [f"caption {k}" for k in range(50)] + CAPTIONS
    captions = [pool[3], CAPTIONS[0], "a prompt outside the pool"]
    idx = T.distractor_indices(captions, pool, seed=7, k=99)
    assert idx.shape == (3, 99) and idx.dtype == np.int64
    assert np.array_equal(idx, T.distractor_indices(captions, pool, seed=7, k=99))
    assert not np.array_equal(idx, T.distractor_indices(captions, pool, seed=8, k=99))
    for i, text in enumerate(captions):
        assert all(pool[j] != text for j in idx[i])  # never the sample's own text
        for j in range(99):
            first = int(rng.uniform(7, T.DISTRACTOR_STREAM, i, j) * len(pool))
            if pool[first] != text:  # drawn again only on a collision
                assert idx[i, j] == first
    # a collision is redrawn with the attempt counter: row 0 asks for pool[3] and gets others
    collided = [j for j in range(99) if int(rng.uniform(7, T.DISTRACTOR_STREAM, 0, j) * 54) == 3]
    for j in collided:
        assert idx[0, j] != 3
    with pytest.raises(UserError, match="distinct captions"):
        T.distractor_indices(["x"], ["x", "x"])


# -- a tiny local CLIP ----------------------------------------------------------------------
def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE alphabet (each byte char and its end-of-word form) + specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised 2-layer CLIP (32 px ViT, byte-level tokenizer, no merges) saved
    with its processor, as a user's local CLIP folder would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = _byte_vocab()
    specials = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                "pad_token_id": vocab["<|endoftext|>"]}  # fmt: skip
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         **specials),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    size = {"shortest_edge": 32}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))  # fmt: skip
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    from condnoise.data.scenes import Scenes

    return np.array(Scenes("test", num_samples=len(CAPTIONS)).images_uint8())


def test_local_clip_matches_torchmetrics_and_a_hand_computation(tiny_clip, images, one_thread):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from condnoise.evaluation.features import get_extractor

    ex = get_extractor(f"clip:{tiny_clip}")
    assert ex.name == f"clip:{tiny_clip}" and ex.dim == 16
    feats, text = ex.extract(images), ex.encode_text(CAPTIONS)
    assert feats.shape == (4, 16) and text.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    ours = T.clip_scores(feats, text)

    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():  # by hand: vision tower -> pooled -> projection; text at its EOS
        pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
        vi = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        enc = proc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        th = model.text_model(**enc).last_hidden_state
        eos = (enc["input_ids"] == model.config.text_config.eos_token_id).int().argmax(1)
        te = model.text_projection(th[torch.arange(len(CAPTIONS)), eos])
    hand = 100 * torch.nn.functional.cosine_similarity(vi, te).numpy()
    np.testing.assert_allclose(ours, hand, atol=1e-3)

    class Features(torch.nn.Module):
        """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns
        model outputs (pooler_output = the projected embedding)."""

        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *a, **k):
            return self.clip.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.clip.get_text_features(*a, **k).pooler_output

    for i in range(len(CAPTIONS)):  # torchmetrics clips its mean: one pair at a time
        metric = CLIPScore(model_name_or_path=lambda: (Features(model), proc))
        metric.update(torch.from_numpy(images[i]).permute(2, 0, 1), [CAPTIONS[i]])
        assert float(metric.compute()) == pytest.approx(max(ours[i], 0.0), abs=1e-3)
    assert T.clip_score(feats, text) == pytest.approx(np.maximum(hand, 0).mean(), abs=1e-3)


def test_clip_spec_errors(tmp_path):
    from condnoise.evaluation.features import get_extractor

    with pytest.raises(UserError, match="does not exist"):
        get_extractor(f"clip:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="not a transformers CLIP folder"):
        get_extractor(f"clip:{tmp_path}")
    with pytest.raises(UserError, match="needs a CLIP folder"):
        get_extractor("clip:")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(UserError, match="cannot load a CLIP model"):
        get_extractor(f"clip:{tmp_path}")
