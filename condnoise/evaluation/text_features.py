"""Text-image feature extractors: an image tower for the feature metrics (FID, precision /
recall, RMD, top-5 L2, memorization in CLIP space, as the paper computes the last three,
section 5) and a text tower for the alignment metrics (``text_metrics``).

- ``scenes-clip``: the embedded dual encoder (``condnoise.evaluation.scenes_clip``).
- ``clip:PATH``: a ``transformers`` CLIP (``CLIPModel`` + ``CLIPProcessor``) from a local
  folder, or a hub id such as ``clip:openai/clip-vit-base-patch16`` when the machine has
  network. Images go through the model's own processor (resize, centre crop, normalise);
  features are ``get_image_features`` / ``get_text_features`` (projected embeddings).

Both give L2-normalised embeddings (CLIP space), float32 ``[N, D]``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from condnoise.errors import UserError
from condnoise.evaluation.features import CLIP_PREFIX, Extractor, module_fingerprint

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class TextImageExtractor(Extractor):
    """An extractor with a text tower: ``encode_text(captions) -> float32 [N, D]``."""

    text_batch_size = 256

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> np.ndarray:
        """L2-normalised caption embeddings float32 ``[N, dim]``."""
        if not captions:
            raise UserError(f"{self.name}: no captions to embed")
        out = [self._encode_text(list(captions[s:s + self.text_batch_size]))
               for s in range(0, len(captions), self.text_batch_size)]  # fmt: skip
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).numpy()


class ScenesClipExtractor(TextImageExtractor):
    """``scenes-clip``: 128-d embeddings of the embedded dual encoder (RGB 32 or 64 px)."""

    name = "scenes-clip"
    batch_size = 1000

    def __init__(self, folder: str | Path | None = None, *, train_if_missing: bool = True) -> None:
        from condnoise.evaluation.scenes_clip import EMBED_DIM, load_scenes_clip

        self.model, self.card = load_scenes_clip(folder, train_if_missing=train_if_missing)
        self.dim = EMBED_DIM

    def fingerprint(self) -> str:
        return self.card["sha256"][:12]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from condnoise.evaluation.scenes_clip import image_input

        images = x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return self.model.encode_image(image_input(images))

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.model.text.tokenize(captions))


def clip_location(spec: str) -> str:
    """A local folder (must hold ``config.json``) or a hub id; UserError otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--features clip:{spec}: {path} is not a transformers CLIP folder "
                            "(no config.json)")
        return str(path)
    if spec.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(spec):
        raise UserError(f"--features clip:{spec}: {path} does not exist (give a local CLIP "
                        "folder or a hub id such as openai/clip-vit-base-patch16)")
    return spec


def _pooled(out) -> torch.Tensor:
    """``get_*_features`` output: a tensor (transformers 4) or a model output whose
    ``pooler_output`` holds the projected embedding (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipExtractor(TextImageExtractor):
    """``clip:PATH``: a transformers CLIP's projected image / text embeddings."""

    batch_size = 64

    def __init__(self, spec: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name = f"{CLIP_PREFIX}{spec}"
        where = clip_location(spec)
        try:
            self.model = CLIPModel.from_pretrained(where).eval()
            self.processor = CLIPProcessor.from_pretrained(where)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--features clip:{spec}: cannot load a CLIP model: {first}") from None
        self.dim = int(self.model.config.projection_dim)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.model)
        return self._fingerprint

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        images = list(x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        feats = _pooled(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(feats, dim=-1)

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer
        long = sum(len(ids) > self.max_tokens for ids in tok(captions)["input_ids"])
        if long:
            warnings.warn(f"{self.name}: {long} of {len(captions)} captions truncated to "
                          f"{self.max_tokens} tokens", stacklevel=3)  # fmt: skip
        enc = tok(captions, padding=True, truncation=True, max_length=self.max_tokens,
                  return_tensors="pt")  # fmt: skip
        return _pooled(self.model.get_text_features(input_ids=enc["input_ids"],
                                                    attention_mask=enc["attention_mask"]))
