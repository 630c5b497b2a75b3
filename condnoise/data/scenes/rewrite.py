"""Exact caption corruption on ``scenes`` (paper section 2, "text rewrite").

The paper's GPT-4 rewrites make a caption partially mismatch its image at five severities.
On scenes the mismatch can be exact: ``AttributeRewriter`` parses the caption back into its
record, changes ``CHANGES_BY_SEVERITY[s]`` attributes (an item's class, colour, size or
position, or the background; the layout stays valid and train / test captions never name a
held-out (class, colour) pair) and renders the new record with fresh synonyms and word
order. ``ParaphraseRewriter`` (the control) re-renders the same record differently and
changes no attribute. ``annotate`` writes ``changes.jsonl`` beside a manifest: per row the
attribute differences between the sample's record and the parsed corrupted caption.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from condnoise.data.scenes.captions import (
    N_CHOICES,
    CaptionParseError,
    diff_size,
    make_record,
    parse_caption,
    record_diff,
    render_caption,
)
from condnoise.data.scenes.vocab import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    FIELDS,
    POSITIONS,
    SIZES,
    allowed_pair,
    is_valid_layout,
)
from condnoise.errors import UserError

CHANGES_BY_SEVERITY = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
MAX_TRIES = 50
CHANGES_FILE = "changes.jsonl"


def _parse(caption: str, who: str) -> dict:
    try:
        return parse_caption(caption)
    except CaptionParseError as e:
        raise UserError(f"the {who} rewriter works on scenes captions only: {e}") from None


class AttributeRewriter:
    """Change 1-3 attributes of the caption's record (see module docstring)."""

    name = "attributes"

    def __init__(self, novel: bool = False) -> None:
        self.novel = novel  # test-novel captions may keep / create held-out pairs

    def __call__(self, caption: str, severity: int, rng: np.random.Generator) -> str:
        if severity not in CHANGES_BY_SEVERITY:
            raise ValueError(f"severity must be in 1..5, got {severity}")
        record = _parse(caption, self.name)
        m = CHANGES_BY_SEVERITY[severity]
        for _ in range(MAX_TRIES):
            new = self.mutate(record, m, rng)
            if new is not None and len(record_diff(record, new)) == m:
                return render_caption(new, rng.random(N_CHOICES))
        raise UserError(f"cannot change {m} attribute(s) of caption {caption!r}")

    def mutate(self, record: dict, m: int, rng: np.random.Generator) -> dict | None:
        """``record`` with ``m`` distinct attribute slots changed, or None if it ran out."""
        items = [dict(it) for it in record["items"]]
        bg = record["background"]
        slots = [(k, f) for k in range(len(items)) for f in FIELDS] + [(None, "background")]
        done = 0
        for s in rng.permutation(len(slots)).tolist():
            k, f = slots[s]
            options = self._options(items, k, f, bg)
            if not options:
                continue
            value = options[int(rng.integers(len(options)))]
            if k is None:
                bg = value
            else:
                items[k][f] = value
            done += 1
            if done == m:
                return make_record(items, bg)
        return None

    def _allowed(self, c: int, colour: str) -> bool:
        return self.novel or allowed_pair(c, colour)

    def _options(self, items: list[dict], k: int | None, f: str, bg: str) -> list:
        if k is None:
            return [b for b in BACKGROUNDS if b != bg]
        it = items[k]
        if f == "class":
            return [c for c in range(len(CLASSES)) if c != it["class"]
                    and self._allowed(c, it["colour"])]  # fmt: skip
        if f == "colour":
            return [c for c in COLOURS if c != it["colour"] and self._allowed(it["class"], c)]
        layout = [(x["position"], x["size"]) for x in items]
        if f == "size":
            cand = [(k, (it["position"], s)) for s in SIZES if s != it["size"]]
        else:
            used = {x["position"] for x in items}
            cand = [(k, (p, it["size"])) for p in POSITIONS if p not in used]
        ok = [v for j, v in cand if is_valid_layout([*layout[:j], v, *layout[j + 1 :]])]
        return [v[1] if f == "size" else v[0] for v in ok]


class ParaphraseRewriter:
    """The control: the same record in other words (severity is ignored)."""

    name = "paraphrase"

    def __call__(self, caption: str, severity: int, rng: np.random.Generator) -> str:
        record = _parse(caption, self.name)
        for _ in range(MAX_TRIES):
            out = render_caption(record, rng.random(N_CHOICES))
            if out != caption:
                return out
        raise UserError(f"found no paraphrase of caption {caption!r}")


def make_rewriter(name: str, novel: bool = False):
    """The scenes rewriter called ``name`` (``attributes`` or ``paraphrase``)."""
    if name == "attributes":
        return AttributeRewriter(novel)
    if name == "paraphrase":
        return ParaphraseRewriter()
    raise UserError(f"unknown scenes rewriter {name!r}; choose attributes or paraphrase")


def annotate(manifest, records: list[dict], severities=None) -> None:
    """Attach ``changes.jsonl`` to ``manifest`` and count rows by number of changes.

    Row: ``{"index", "severity", "n_changes", "changes", "record"}``; ``record`` is the
    corrupted caption's record (None, like ``n_changes``, when the caption does not parse,
    e.g. from a plugged-in rewriter). An added / removed item (swap) counts 4 changes.
    """
    lines, counts, unparsed = [], Counter(), 0
    sev = [None] * len(manifest.index) if severities is None else np.asarray(severities).tolist()
    for j, i in enumerate(manifest.index.tolist()):
        try:
            new = parse_caption(manifest.corrupted[j])
        except CaptionParseError:
            new = None
        row = {"index": i, "severity": sev[j], "n_changes": None, "changes": None, "record": new}
        if new is None:
            unparsed += 1
        else:
            changes = record_diff(records[i], new)
            row.update(n_changes=diff_size(changes), changes=changes)
            counts[row["n_changes"]] += 1
        lines.append(json.dumps(row) + "\n")
    manifest.sidecars[CHANGES_FILE] = "".join(lines)
    manifest.params["attribute_changes"] = {str(k): counts[k] for k in sorted(counts)}
    if unparsed:
        manifest.params["unparsed_captions"] = unparsed
