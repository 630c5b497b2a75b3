"""Report sections and their blocks as small typed classes, rendered to HTML or Markdown
by one dispatcher (:func:`render_document`) through a :class:`Renderer` per format."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from condnoise.io import write_bytes


@dataclass(frozen=True)
class Text:
    """A paragraph; ``**bold**`` spans are kept in Markdown and become <b> in HTML."""

    text: str


@dataclass(frozen=True)
class Figure:
    """A figure made for the report (PNG bytes)."""

    png: bytes
    caption: str


@dataclass(frozen=True)
class Image:
    """A PNG a cell wrote (sample grid, walk, theory figure), embedded when rendered."""

    path: Path
    caption: str

    @property
    def png(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


Block = Text | Figure | Image | Table


class Status(StrEnum):
    """Whether a section has content, and why not."""

    POPULATED = "populated"
    NOT_IN_GRID = "not-in-grid"  # the preset's grid does not produce its inputs
    NOT_APPLICABLE = "not-applicable"  # e.g. entropy for pixel-space models
    INCOMPLETE = "incomplete"  # its cells are not finished yet


@dataclass
class Section:
    id: str
    title: str
    status: Status = Status.POPULATED
    note: str = ""
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Section:
        self.blocks.extend(blocks)
        return self

    def text(self, text: str) -> None:
        self.add(Text(text))

    def figure(self, png: bytes, caption: str) -> None:
        self.add(Figure(png, caption))

    def image(self, path: Path, caption: str) -> None:
        self.add(Image(path, caption))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.add(Table(headers, rows))


class Renderer:
    """One output format: how a document head, a section head and each block look."""

    def head(self, title: str, description: str, header: dict[str, str],
             sections: list[Section]) -> list[str]:  # fmt: skip
        raise NotImplementedError

    def section(self, s: Section) -> list[str]:
        raise NotImplementedError

    def text(self, b: Text) -> list[str]:
        raise NotImplementedError

    def picture(self, png: bytes, caption: str, s: Section, scaled: bool) -> list[str]:
        raise NotImplementedError

    def table(self, b: Table) -> list[str]:
        raise NotImplementedError

    def end(self) -> list[str]:
        return []


def render_block(block: Block, s: Section, r: Renderer) -> list[str]:
    """The one dispatcher from a block's type to the renderer's method."""
    match block:
        case Text():
            return r.text(block)
        case Figure():
            return r.picture(block.png, block.caption, s, scaled=False)
        case Image():
            return r.picture(block.png, block.caption, s, scaled=True)
        case Table():
            return r.table(block)
    raise TypeError(f"not a report block: {block!r}")


def render_document(title: str, description: str, header: dict[str, str],
                    sections: list[Section], r: Renderer) -> str:  # fmt: skip
    out = r.head(title, description, header, sections)
    for s in sections:
        out += r.section(s)
        for b in s.blocks:
            out += render_block(b, s, r)
    return "\n".join(out + r.end())


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid
#ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2)
{text-align:left}figure{display:inline-block;margin:.5em;vertical-align:top;max-width:100%}
figcaption{font-size:.8em;color:#555;max-width:560px}img{max-width:100%;image-rendering:
pixelated}.status{font-size:.8em;padding:1px 6px;border-radius:3px;background:#eee}
.absent{color:#a60}nav a{margin-right:.8em;font-size:.85em}"""


class HtmlRenderer(Renderer):
    """One self-contained page: CSS inline, every PNG embedded as base64, no links out."""

    def __init__(self) -> None:
        self.open = False  # inside a <section>

    def head(self, title, description, header, sections):
        esc = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
               f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
               f"<p>{esc(description)}</p><ul>"]  # fmt: skip
        out += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in header.items()]
        out.append("</ul><nav>" + "".join(f"<a href='#{s.id}'>{esc(s.title.split(':')[0])}</a>"
                                          for s in sections) + "</nav>")  # fmt: skip
        return out

    def section(self, s):
        cls = "" if s.status == Status.POPULATED else " absent"
        out = ["</section>"] if self.open else []
        self.open = True
        out.append(f"<section id='{s.id}'><h2>{html.escape(s.title)} <span "
                   f"class='status{cls}'>{html.escape(s.status)}</span></h2>")  # fmt: skip
        if s.note:
            out.append(f"<p class='absent'>{html.escape(s.note)}</p>")
        return out

    def text(self, b):
        parts = html.escape(b.text).split("**")
        return ["<p>" + "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)) + "</p>"]

    def picture(self, png, caption, s, scaled):
        src = "data:image/png;base64," + base64.b64encode(png).decode()
        style = f" style='width:{_display_width(png)}px'" if scaled else ""
        cap = html.escape(caption)
        return [f"<figure><img src='{src}'{style} alt='{cap}'><figcaption>{cap}</figcaption></figure>"]

    def table(self, b):
        out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers) + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                for row in b.rows]  # fmt: skip
        return out + ["</table>"]

    def end(self):
        return (["</section>"] if self.open else []) + ["</body></html>"]


class MarkdownRenderer(Renderer):
    """Markdown with the figures written beside it as ``figures/{section}-{n:02d}.png``."""

    def __init__(self, fig_dir: Path) -> None:
        self.fig_dir, self.count = Path(fig_dir), 0

    def head(self, title, description, header, sections):
        return [f"# {title}", "", description, ""] + [f"- **{k}**: {v}" for k, v in header.items()]

    def section(self, s):
        return ["", f"## {s.title} ({s.status})", ""] + ([f"_{s.note}_", ""] if s.note else [])

    def text(self, b):
        return [b.text, ""]

    def picture(self, png, caption, s, scaled):
        self.count += 1
        name = f"{s.id}-{self.count:02d}.png"
        write_bytes(self.fig_dir / name, png)
        return [f"![{caption}](figures/{name})", "", f"_{caption}_", ""]

    def table(self, b):
        out = ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
        return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in b.rows] + [""]

    def end(self):
        return [""]


def _display_width(png: bytes) -> int:
    """Small sample grids (28-32 px tiles) are shown enlarged, pixelated, up to 900 px."""
    from PIL import Image as PILImage

    width = PILImage.open(io.BytesIO(png)).size[0]
    return int(max(width, min(3 * width, 900)))
