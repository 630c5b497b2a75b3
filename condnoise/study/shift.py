"""Mean L2 shift of the condition embedding a model was trained with (paper Fig. 8a x-axis).

For every training sample, ``c_used`` is the embedding the denoiser saw in training mode
(the stored, possibly corrupted label, passed through the model's perturbation) and
``c_clean`` the embedding of the true label; the shift is ``mean ||c_used - c_clean||``.
This puts CEP (noise on the embedding, section 3) and fixed / random data corruption
(section 2: a wrong label moves the embedding to another class's) on one axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def embedding_shift(
    run_dir: Path, *, manifest_dir: Path | None = None, max_rows: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """Measure the shift with the run's EMA weights on (up to ``max_rows``) training labels."""
    import torch

    from condnoise.data import open_source
    from condnoise.training.data import apply_corruption
    from condnoise.training.runtime import load_run

    run = load_run(run_dir)
    d = run.config.data
    source = open_source(d.source, d.split, data_dir=d.data_dir, image_size=d.image_size)
    clean = np.array(source.conditions(), dtype=np.int64)  # writable copy for torch
    used = clean
    if manifest_dir is not None:
        view = apply_corruption(source, str(Path(manifest_dir) / "manifest"))
        used = np.array(view.conditions(), dtype=np.int64)
    n = min(len(clean), max_rows)
    idx = torch.arange(n)
    y_clean = torch.as_tensor(clean[:n])
    y_used = torch.as_tensor(used[:n])
    model = run.model
    torch.manual_seed(seed)
    with torch.no_grad():
        c_clean = model.encoder.encode(y_clean)
        c_in = model.encoder.encode(y_used)
        pert = model.perturbation
        pert.train()
        try:
            c_used = pert(c_in, y_used, encoder=model.encoder, sample_index=idx, step=0)
        finally:
            pert.eval()
        shift = (c_used.float() - c_clean.float()).norm(dim=1)
    return {
        "mean_l2_shift": float(shift.mean()),
        "data_corrupted_fraction": float((y_used != y_clean).float().mean()),
        "perturbed_fraction": float((shift > 0).float().mean()),
        "embedding_dim": int(c_clean.shape[1]),
        "rows": n,
    }
