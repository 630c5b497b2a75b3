"""Mean L2 shift of the condition embedding a model was trained with (paper Fig. 8a x-axis).

For every training sample, ``c_used`` is the embedding the denoiser saw in training mode
(the stored, possibly corrupted condition, passed through the model's perturbation) and
``c_clean`` the embedding of the true condition; the shift is ``mean ||c_used - c_clean||``
(per token for captions, averaged over the real tokens: ``conditioning.token_shift``).
This puts CEP (noise on the embedding, section 3) and fixed / random data corruption
(section 2: a wrong label moves the embedding to another class's) on one axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def embedding_shift(
    run_dir: Path, *, manifest_dir: Path | None = None, max_rows: int = 20000, seed: int = 0
) -> dict[str, Any]:
    """Measure the shift with the run's EMA weights on (up to ``max_rows``) training labels."""
    import torch

    from condnoise.conditioning import token_shift
    from condnoise.data import open_source
    from condnoise.training.data import apply_corruption
    from condnoise.training.runtime import load_run

    run = load_run(run_dir)
    d = run.config.data
    source = open_source(d.source, d.split, data_dir=d.data_dir, image_size=d.image_size)
    clean = list(source.conditions())
    used = clean
    if manifest_dir is not None:
        view = apply_corruption(source, str(Path(manifest_dir) / "manifest"))
        used = list(view.conditions())
    n = min(len(clean), max_rows)
    idx = torch.arange(n)
    encoder = run.model.encoder
    cond_clean, cond_used = encoder.as_cond(clean[:n]), encoder.as_cond(used[:n])
    torch.manual_seed(seed)
    with torch.no_grad():
        e_clean, e_in = encoder.embed(cond_clean), encoder.embed(cond_used)
        pert = run.model.perturbation
        pert.train()
        try:
            e_used = pert(e_in, cond_used, encoder=encoder, sample_index=idx, step=0)
        finally:
            pert.eval()
        shift = token_shift(e_clean, e_used)
    changed = (cond_used != cond_clean).reshape(n, -1).any(1)
    return {
        "mean_l2_shift": float(shift.mean()),
        "data_corrupted_fraction": float(changed.float().mean()),
        "perturbed_fraction": float((shift > 0).float().mean()),
        "embedding_dim": int(e_clean.dim),
        "rows": n,
    }
