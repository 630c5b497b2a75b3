"""matplotlib on the Agg backend (no display), shared by every stage that draws figures."""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (imported on first use: the CLI stays fast)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, *, dpi: int = 110) -> bytes:
    """Render ``fig`` as PNG bytes (tight bounding box) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
