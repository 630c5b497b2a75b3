"""Report blocks: one dispatcher renders every typed block to HTML and Markdown."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image as PILImage

from condnoise.study.aggregate import Verdict, compare, estimate
from condnoise.study.blocks import (
    Figure,
    HtmlRenderer,
    Image,
    MarkdownRenderer,
    Section,
    Status,
    Table,
    Text,
    render_block,
    render_document,
)


def _png(width: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((4, width), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def sections(tmp_path):
    grid = tmp_path / "grid.png"
    grid.write_bytes(_png(30))
    one_seed = estimate([3.0])
    full = Section("a", "A: first").add(
        Text("plain and **bold**"), Figure(_png(8), "fig <1>"), Image(grid, "grid"),
        Table(["model", "FID"], [["clean", one_seed.fmt()]]),
    )  # fmt: skip
    absent = Section("b", "B", status=Status.NOT_IN_GRID, note="not in this preset's grid")
    return [full, absent]


def test_html_is_self_contained_and_renders_every_block(sections):
    page = render_document("T", "desc", {"k": "v"}, sections, HtmlRenderer())
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")
    assert page.count("<section") == page.count("</section>") == 2
    assert "plain and <b>bold</b>" in page and "fig &lt;1&gt;" in page
    assert page.count("<img src='data:image/png;base64,") == 2
    assert base64.b64encode(_png(8)).decode() in page
    assert "style='width:90px'" in page  # a small cell image is shown 3x
    assert "<td>3 ± n/a (n=1)</td>" in page  # one seed: no interval, never ± 0
    assert "<span class='status absent'>not-in-grid</span>" in page
    assert "src='http" not in page and "<script" not in page


def test_markdown_writes_figures_beside_it(sections, tmp_path):
    md = render_document("T", "desc", {"k": "v"}, sections, MarkdownRenderer(tmp_path / "figs"))
    assert "## A: first (populated)" in md and "## B (not-in-grid)" in md
    assert "_not in this preset's grid_" in md and "plain and **bold**" in md
    assert "![fig <1>](figures/a-01.png)" in md and "![grid](figures/a-02.png)" in md
    assert (tmp_path / "figs" / "a-01.png").read_bytes() == _png(8)
    assert "| model | FID |\n|---|---|\n| clean | 3 ± n/a (n=1) |" in md
    with pytest.raises(TypeError):
        render_block("not a block", sections[0], HtmlRenderer())  # type: ignore[arg-type]


def test_verdict_is_an_enum():
    low, high = estimate([1.0, 1.1, 0.9]), estimate([3.0, 3.2, 2.9])
    assert compare(low, high, lower_is_better=True).verdict is Verdict.BETTER
    assert compare(low, estimate([2.0]), lower_is_better=True).verdict is Verdict.NO_INTERVAL
