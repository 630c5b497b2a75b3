"""Conditions and controls of a data split for sampling a run: ``condnoise sample
--captions-from SPLIT`` / ``--controls-from SPLIT`` and the study's sample cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from condnoise.errors import UserError
from condnoise.training.config import Config


def split_prompts(spec: str, split: str, data_dir: str | None = None) -> Any:
    """The captions of ``split`` of data source ``spec`` as the ``Prompts`` of a text run
    (sample i gets caption ``i % P``, paired with its image)."""
    from condnoise.data import open_source
    from condnoise.diffusion.sampling import Prompts

    source = open_source(spec, split, data_dir=data_dir)
    if source.meta.condition_kind != "caption":
        raise UserError(f"--captions-from: {spec}:{split} has class labels, not captions")
    texts = [str(c) for c in source.conditions()]
    return Prompts(texts, f"split:{source.meta.name}:{split}", list(range(len(texts))))


def split_controls(config: Config, split: str, num: int, *, kind: str | None = None,
                   scale: float = 1.0, data: str | None = None) -> tuple[Any, list[int] | None, Any]:
    """``(ControlSet, labels or None, Prompts or None)``: the controls of the first
    P = min(``num``, size) items of ``split`` (of ``data``, default the run's training
    source) and their conditions, for sampling the run of ``config`` (``condnoise sample
    --controls-from``). An adapter run is fed them with its own control settings (``kind``,
    if given, must be its control); a base run only records them (``kind`` required: the
    without-control baseline of the control-fidelity metrics)."""
    from condnoise.data import open_source
    from condnoise.data.controls import Control
    from condnoise.diffusion.sampling import ControlSet, Prompts

    f, d = config.finetune, config.data
    if f is None and kind is None:
        raise UserError("--controls-from on a base run (no adapter) records the controls only: name "
                        "their kind with --control canny|mask")  # fmt: skip
    if f is not None and kind not in (None, f.control):
        raise UserError(f"--control {kind}: this adapter was fine-tuned on {f.control} controls")
    source = open_source(data or d.source, split, data_dir=d.data_dir, image_size=d.image_size)
    low, high = (f.canny_low, f.canny_high) if f is not None else (100.0, 200.0)
    control = Control.for_source(f.control if f is not None else kind, source, low=low, high=high)
    n = min(num, len(source))
    if hasattr(source, "tensors"):
        images = source.tensors()[0][:n]
    else:
        images = torch.stack([source[i][0] for i in range(n)])
    ctl = ControlSet(control.native(images, np.arange(n)), control, f"split:{source.meta.name}:{split}",
                     applied=f is not None, scale=scale)  # fmt: skip
    conds = source.conditions()[:n]
    if source.meta.condition_kind == "caption":
        return ctl, None, Prompts([str(c) for c in conds], ctl.source, list(range(n)))
    return ctl, [int(c) for c in conds], None
