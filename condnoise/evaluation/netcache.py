"""Trained evaluation networks (fmnist-classifier, scenes-recognizer, scenes-clip) in the
cache directory: ``{name}.safetensors`` weights beside a ``{name}.json`` card (accuracies,
training settings, the weights' SHA-256, library versions)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from condnoise.errors import UserError
from condnoise.io import atomic_path, follow_umask, write_json
from condnoise.paths import cache_dir
from condnoise.provenance import environment


def network_dir(folder: str | Path | None) -> Path:
    """``folder``, or the cache directory when None."""
    return Path(folder) if folder else cache_dir()


def save_network(model: nn.Module, folder: str | Path | None, name: str, card: dict) -> dict:
    """Write the weights and the card (with ``sha256`` and ``environment`` added), atomically;
    return the card."""
    from safetensors.torch import save_file

    out = network_dir(folder)
    weights = out / f"{name}.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
        follow_umask(tmp)  # safetensors writes 0600
    card = {**card, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "environment": environment()}  # fmt: skip
    write_json(out / f"{name}.json", card)
    return card


def load_network(build: Callable[[], nn.Module], folder: str | Path | None, name: str,
                 train: Callable[..., object], *, train_if_missing: bool = True,
                 cost: str = "about 1-2 minutes on 2 CPU cores") -> tuple[nn.Module, dict]:  # fmt: skip
    """The cached network ``name`` in eval mode and its card; trained first with ``train``
    (with a warning saying so) when missing, or a UserError when ``train_if_missing`` is off."""
    from safetensors.torch import load_file

    folder = network_dir(folder)
    weights, card_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not (weights.is_file() and card_path.is_file()):
        if not train_if_missing:
            raise UserError(f"no trained {name} in {folder}; run `condnoise features train {name}`")
        import warnings  # a library does not print (the CLI shows this as one line)

        from condnoise.errors import CondnoiseWarning

        warnings.warn(f"{name} not found in {folder}; training it now ({cost})",
                      CondnoiseWarning, stacklevel=2)  # fmt: skip
        train(folder, progress=False)  # no bars: the app decides about them, not a library
    try:
        card = json.loads(card_path.read_text())
        model = build()
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # OSError, JSON, safetensors, state-dict mismatch: one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {name} from {folder}: {reason}; delete {weights.name} "
                        f"and {card_path.name} and run `condnoise features train {name}`") from None
    return model.eval(), card


def fit_one_cycle(model: nn.Module, opt: torch.optim.Optimizer,
                  batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, *, epochs: int,
                  batch_size: int, lr: float, seed: int, desc: str, progress: bool,
                  pct_start: float = 0.3, after_step: Callable[[], None] | None = None) -> None:
    """Train ``model`` for ``epochs`` passes over ``n`` examples in mini-batches
    (``batch_loss(indices)`` gives a batch's loss) with the one-cycle schedule (Smith &
    Topin 2019, ``torch.optim.lr_scheduler.OneCycleLR``); the data order comes from a
    generator seeded with ``seed``, so a cached network is the same on every CPU run."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=pct_start)  # fmt: skip
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n - batch_size + 1, batch_size):
                loss = batch_loss(perm[s:s + batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
