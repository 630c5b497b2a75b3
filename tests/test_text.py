"""Text conditions: tokenization and masks of the three encoders (bert-embed on the packaged
BERT vocabulary, the real frozen MiniLM, a tiny random CLIP saved locally), CEP and the
baselines on token embeddings (padding and null rows untouched, scale exact), caption
swaps, the text denoisers' use of tokens and masks, and the bad-input messages."""

from __future__ import annotations

import math

import pytest
import torch

from condnoise.conditioning import CondEmbedding, cfg_drop, perturb_tokens
from condnoise.conditioning.text import build_text_encoder, minilm_folder
from condnoise.errors import UserError
from condnoise.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CAPS = ["a red bag on the left", "two blue sneakers at the top and on the right and a tiny golden sandal in the middle",
        "a small white coat in the centre"]  # fmt: skip


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return build_text_encoder("bert-embed", max_length=16, dim=32, depth=1, heads=2)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny randomly initialised CLIP text model and BPE tokenizer, saved like a hub folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    merges = [("r", "e"), ("re", "d</w>"), ("b", "a"), ("ba", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    folder = tmp_path_factory.mktemp("clip")
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)  # fmt: skip
    CLIPTextModel(cfg).save_pretrained(folder)
    return folder


def test_bert_wordpiece_tokenization_padding_truncation_and_masks(bert):
    from tokenizers import BertWordPieceTokenizer

    ref = BertWordPieceTokenizer(str(minilm_folder() / "vocab.txt"), lowercase=True)
    ids = bert.tokenize(CAPS[:1])
    expect = ref.encode(CAPS[0]).ids  # [CLS] a red bag on the left [SEP]
    assert ids.shape == (1, 16) and ids[0, : len(expect)].tolist() == expect
    assert expect[0] == 101 and expect[-1] == 102 and ids[0, len(expect):].eq(0).all()
    assert bert.tokenizer.vocab_size == 30522
    mask = bert.mask_of(ids)
    assert mask[0].tolist() == [True] * len(expect) + [False] * (16 - len(expect))
    with pytest.warns(UserWarning, match="1 of 2 captions are longer"):
        long = bert.tokenize(CAPS[:2])
    assert long[1, -1] == 102 and bert.mask_of(long)[1].all()  # truncated, end token kept
    assert long[1, :15].tolist() == ref.encode(CAPS[1]).ids[:15]
    null = bert.null_ids
    assert null[:2].tolist() == [101, 102] and null[2:].eq(0).all()  # the empty caption
    assert bert.is_null(torch.stack([null, long[0]])).tolist() == [True, False]
    assert torch.equal(bert.null_like(long), null.expand(2, -1))
    with pytest.raises(UserError, match="empty"):
        bert.tokenize(["a bag", "  "])


def test_bert_embed_is_trainable_and_zero_on_padding(bert):
    ids = bert.tokenize([CAPS[0], CAPS[2]])
    emb = bert.embed(ids)
    assert emb.tokens.shape == (2, 16, 32) and emb.tokens.requires_grad
    assert emb.tokens[~emb.mask].abs().max() == 0
    real = emb.mask[..., None].float()
    torch.testing.assert_close(emb.pooled, (emb.tokens * real).sum(1) / real.sum(1))
    assert not emb.null.any() and bert.embed(bert.null_like(ids)).null.all()
    assert {n for n, _ in bert.named_parameters()} >= {"token_embedding.weight", "position"}


def test_minilm_states_equal_transformers_and_cache():
    from transformers import AutoModel

    enc = build_text_encoder("minilm", max_length=24, cache_size=8)
    ref = AutoModel.from_pretrained(str(minilm_folder())).eval()
    ids = enc.tokenize(CAPS[::2])
    mask = enc.mask_of(ids)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        emb = enc.embed(ids)
    assert enc.dim == 384 and not any(True for _ in enc.parameters())  # frozen, outside the tree
    torch.testing.assert_close(emb.tokens[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert emb.tokens[~mask].abs().max() == 0
    calls = []
    hook = enc._frozen.model.register_forward_hook(lambda *a: calls.append(1))
    again = enc.embed(ids)  # both captions cached: no forward
    assert calls == [] and torch.equal(again.tokens, emb.tokens)
    enc.embed(enc.tokenize([CAPS[1], CAPS[0]]))  # one new caption
    assert calls == [1]
    hook.remove()


def test_clip_encoder_from_a_local_folder(clip_folder):
    from transformers import AutoTokenizer, CLIPTextModel

    enc = build_text_encoder("clip", path=str(clip_folder), max_length=12)
    ids = enc.tokenize(["a red bag", "bag"])
    ref_tok = AutoTokenizer.from_pretrained(str(clip_folder))
    want_ids = ref_tok(["a red bag", "bag"], padding="max_length", max_length=12).input_ids
    assert ids.tolist() == want_ids and ids[0, 0] == 0 and ids[0, 4:].eq(1).all()  # bos a red bag eos, pad
    mask = enc.mask_of(ids)  # up to the first eos (CLIP pads with eos)
    assert mask.sum(1).tolist() == [5, 3]
    ref = CLIPTextModel.from_pretrained(str(clip_folder)).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = enc.embed(ids).tokens
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert enc.null_ids[:2].tolist() == [0, 1] and enc.dim == 32


def test_encoder_bad_input(tmp_path, clip_folder):
    import shutil

    for name in ("config.json", "model.safetensors"):  # a CLIP folder without its tokenizer
        shutil.copy(clip_folder / name, tmp_path / name)
    with pytest.raises(UserError, match="no vocabulary"):
        build_text_encoder("clip", path=str(tmp_path))
    with pytest.raises(UserError, match="vocabulary not found"):
        build_text_encoder("bert-embed", path=str(tmp_path))
    with pytest.raises(UserError, match="model folder not found"):
        build_text_encoder("clip", path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="exceeds"):
        build_text_encoder("clip", path=str(clip_folder), max_length=100)
    with pytest.raises(UserError, match="encoder.name: unknown encoder 'bert'; choose one of class, bert-embed"):
        ModelConfig.from_dict({"family": "unet", "encoder": {"name": "bert"}})
    with pytest.raises(UserError, match="label-smoothing needs class labels"):
        ModelConfig.from_dict({"family": "unet", "encoder": {"name": "bert-embed"},
                               "perturbation": "label-smoothing"})  # fmt: skip


def _text_model(family: str, pert: str = "none", **kw):
    torch.manual_seed(0)
    size = {"family": "unet", "size": "tiny"} if family == "unet" else {"family": "dit", "size": "T/4", "depth": 2}
    cfg = {**size, "encoder": {"name": "bert-embed", "max_length": 24, "depth": 1, "heads": 2},
           "perturbation": {"name": pert, **kw}, "cfg_dropout": 0.0}  # fmt: skip
    return build_model(cfg, in_channels=3, image_size=16)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_cep_on_tokens_padding_and_null_untouched_scale_exact(gamma):
    m = _text_model("unet", "cep-u", gamma=gamma)
    enc = m.encoder
    ids = enc.tokenize(CAPS[::2] * 200)
    ids[::5] = enc.null_ids  # rows dropped to the empty caption
    m.train()
    with torch.no_grad():
        clean = enc.embed(ids)
        out = m.perturbation(clean, ids, encoder=enc)
    delta = out.tokens - clean.tokens
    real = clean.mask & ~clean.null[:, None]
    assert torch.equal(out.tokens[~real], clean.tokens[~real])  # padding and null rows: exact
    bound = gamma / math.sqrt(enc.dim)
    d = delta[real]
    assert d.abs().max() <= bound * (1 + 1e-5) and d.abs().max() > 0.99 * bound
    assert d.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    shift = m.perturbation.stats()["mean_l2_shift"]
    assert shift == pytest.approx(gamma / math.sqrt(3), rel=0.02)  # per token, E||delta|| ~ gamma/sqrt(3)
    mask = out.mask[..., None].float()
    torch.testing.assert_close(out.pooled, (out.tokens * mask).sum(1) / mask.sum(1))  # pooled follows
    m.eval()
    assert torch.equal(m.perturbation(clean, ids, encoder=enc).tokens, clean.tokens)


def test_shared_noise_function_gaussian_and_mask():
    torch.manual_seed(0)
    tokens, mask = torch.randn(64, 8, 256), torch.rand(64, 8) < 0.6
    out = perturb_tokens(tokens, mask, 2.0, "gaussian")
    assert torch.equal(out[~mask], tokens[~mask])
    assert (out - tokens)[mask].std().item() == pytest.approx(2 / 16, rel=0.03)


@pytest.mark.parametrize("name,kw", [("cep-fixed", {"fraction": 0.5}), ("dropout", {"p": 0.3}),
                                     ("cep-g", {"gamma": 1.0})])  # fmt: skip
def test_baselines_on_captions(name, kw):
    m = _text_model("dit", name, **kw)
    enc = m.encoder
    ids = enc.tokenize(CAPS * 100)
    idx = torch.arange(300)
    m.train()
    with torch.no_grad():
        clean = enc.embed(ids)
        a = m.perturbation(clean, ids, encoder=enc, sample_index=idx, step=1)
        b = m.perturbation(clean, ids, encoder=enc, sample_index=idx, step=2)
    assert torch.equal(a.tokens[~clean.mask], clean.tokens[~clean.mask])
    assert not torch.equal(a.tokens, clean.tokens)
    assert torch.equal(a.tokens, b.tokens) == (name == "cep-fixed")  # fixed: same delta every step
    if name == "cep-fixed":  # a pure function of the index: another batch order, same rows
        perm = torch.randperm(300)
        c = m.perturbation(clean.with_tokens(clean.tokens[perm], clean.mask[perm]), ids[perm], encoder=enc,
                           sample_index=idx[perm], step=5)  # fmt: skip
        assert torch.equal(c.tokens, a.tokens[perm])


def test_random_flip_swaps_captions_at_rate_eta():
    m = _text_model("unet", "random-flip", eta=0.2, seed=3)
    enc = m.encoder
    table = enc.tokenize([f"a {c} bag on the left" for c in ("red", "blue", "green", "white")] * 500)
    m.perturbation.bind_conditions(table)
    idx = torch.arange(2000)
    m.train()
    with torch.no_grad():
        clean = enc.embed(table)
        out = m.perturbation(clean, table, encoder=enc, sample_index=idx, step=7)
    swapped, partner = m.perturbation.swap_partners(idx, 7, len(table))
    assert swapped.float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert (partner != idx).all() and partner.max() < 2000
    changed = (out.tokens != clean.tokens).flatten(1).any(1)
    same_caption = (table[partner] == table).all(1)
    assert torch.equal(changed, swapped & ~same_caption)
    with torch.no_grad():
        want = enc.embed(table[partner[swapped]])
    torch.testing.assert_close(out.tokens[swapped], want.tokens)
    again, _ = m.perturbation.swap_partners(idx, 7, len(table))
    assert torch.equal(again, swapped)  # (seed, step, index) only
    assert not torch.equal(m.perturbation.swap_partners(idx, 8, len(table))[0], swapped)


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_text_denoisers_attend_to_real_tokens_only(family):
    m = _text_model(family).eval()
    for p in m.denoiser.parameters():  # leave the zero inits (adaLN-Zero, zero cross-attention)
        torch.nn.init.normal_(p, std=0.05)
    ids = m.encoder.tokenize(CAPS[::2])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 300])
    with torch.no_grad():
        emb = m.encoder.embed(ids)
        base = m.denoiser(x, t, emb)
        junk = emb.tokens + 5.0 * (~emb.mask)[..., None]  # garbage on padding, pooled unchanged
        same = m.denoiser(x, t, CondEmbedding(junk, emb.mask, emb.null, emb.pooled))
        other = m.denoiser(x, t, m.encoder.embed(m.encoder.tokenize(CAPS[1:3])))
    torch.testing.assert_close(same, base, atol=1e-5, rtol=1e-5)
    assert (other - base).abs().max() > 1e-3


def test_cfg_dropout_to_the_empty_caption_and_kind_errors():
    m = _text_model("unet")
    ids = m.encoder.tokenize(CAPS * 2000)
    torch.manual_seed(1)
    dropped = cfg_drop(ids, 0.1, m.null_like(ids))
    assert m.is_null(dropped).float().mean().item() == pytest.approx(0.1, abs=0.01)
    keep = ~m.is_null(dropped)
    assert torch.equal(dropped[keep], ids[keep])
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UserError, match="conditions on captions"):
        m(x, torch.tensor([1, 1]), torch.tensor([3, 4]))  # class labels to a text model
    with pytest.raises(UserError, match="has class labels"):
        m.encoder.as_cond([1, 2])
    cls = build_model({"family": "unet", "size": "tiny"}, in_channels=3, image_size=16, num_classes=10)
    with pytest.raises(UserError, match="conditions on class labels"):
        cls(x, torch.tensor([1, 1]), ids[:2])
    with pytest.raises(UserError, match="has captions"):
        cls.encoder.as_cond(CAPS)
