"""The caption grammar of ``scenes``: render a record as text, parse it back, compare records.

caption := [BG ", "] [PREFIX] GROUP (SEP GROUP)* [" " BG]
GROUP   := COUNT SIZE COLOUR NOUN PLACES  |  PLACES ", " COUNT SIZE COLOUR NOUN (first
           group of a caption without prefix only)
PLACES  := PLACE | PLACE " and " PLACE | PLACE ", " PLACE " and " PLACE
BG      := ("on" | "against") " a " BGWORD " background"

Items with equal class, colour and size form one group ("two red sneakers on the left and
at the top"; plural noun, one place per item). Every word slot has synonyms (tables
below); group order, place order, the separator, the prefix, the background phrase and its
side, and PLACES-first order vary. The black background is mentioned or not; the others
always are. All choices come from a vector of uniforms, so a caption is a pure function of
(record, choices); ``parse_caption(render_caption(r, u)) == r`` for every record and u.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from condnoise.data.scenes.vocab import BACKGROUNDS, CLASSES, COLOURS, FIELDS, POSITIONS, SIZES

N_CHOICES = 48  # uniforms per caption (at most 7 + 6 per group + 1 per item = 28 are used)

NOUNS: tuple[tuple[tuple[str, str], ...], ...] = (  # (singular, plural) per class
    (("t-shirt", "t-shirts"), ("tee", "tees")),
    (("pair of trousers", "pairs of trousers"), ("pair of pants", "pairs of pants")),
    (("pullover", "pullovers"), ("sweater", "sweaters"), ("jumper", "jumpers")),
    (("dress", "dresses"), ("gown", "gowns")),
    (("coat", "coats"), ("jacket", "jackets")),
    (("sandal", "sandals"), ("flip-flop", "flip-flops")),
    (("shirt", "shirts"), ("blouse", "blouses")),
    (("sneaker", "sneakers"), ("trainer", "trainers"), ("running shoe", "running shoes")),
    (("bag", "bags"), ("handbag", "handbags"), ("purse", "purses")),
    (("ankle boot", "ankle boots"), ("boot", "boots")),
)
COLOUR_WORDS = {
    "red": ("red", "scarlet"), "orange": ("orange", "amber"), "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"), "cyan": ("cyan", "turquoise"), "blue": ("blue", "azure"),
    "purple": ("purple", "violet"), "white": ("white", "ivory"),
}  # fmt: skip
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
PLACE_WORDS = {
    "left": ("on the left", "to the left", "on the left side"),
    "right": ("on the right", "to the right", "on the right side"),
    "top": ("at the top", "near the top", "along the top"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
BACKGROUND_WORDS = {
    "black": ("black", "dark"), "gray": ("gray", "grey"), "brown": ("brown",),
    "navy": ("navy", "dark blue"),
}  # fmt: skip
BG_LEADS = ("on", "against")
PREFIXES = ("", "a picture of ", "an image of ", "a photo of ", "a scene with ", "there ")
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
SEPARATORS = ("and", "comma", "semicolon")


class CaptionParseError(ValueError):
    """The text is not a caption of the scenes grammar."""


class _Choices:
    """Sequential picks from a vector of uniforms in [0, 1)."""

    def __init__(self, u: Sequence[float]) -> None:
        self.u, self.i = u, 0

    def pick(self, n: int) -> int:
        v = min(int(self.u[self.i] * n), n - 1)
        self.i += 1
        return v

    def one(self, options: Sequence):
        return options[self.pick(len(options))]


def _groups(record: dict) -> list[dict]:
    """Merge items with equal (class, colour, size); groups in order of first position."""
    groups: dict[tuple, dict] = {}
    for it in record["items"]:
        key = (it["class"], it["colour"], it["size"])
        groups.setdefault(key, {"key": key, "places": []})["places"].append(it["position"])
    return list(groups.values())


def _join(parts: list[str], style: str) -> str:
    if style == "semicolon":
        return "; ".join(parts)
    if style == "and" or len(parts) < 3:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _render_group(g: dict, ch: _Choices, places_first_ok: bool) -> str:
    c, colour, size = g["key"]
    n = len(g["places"])
    order = ch.one(list(itertools.permutations(g["places"])))
    places = _join([ch.one(PLACE_WORDS[p]) for p in order], "comma")
    noun = ch.one(NOUNS[c])[1 if n > 1 else 0]
    words = (ch.one(COUNT_WORDS[n]), ch.one(SIZE_WORDS[size]), ch.one(COLOUR_WORDS[colour]))
    np_ = " ".join([*words, noun])
    first = ch.pick(2) == 1
    return f"{places}, {np_}" if first and places_first_ok else f"{np_} {places}"


def render_caption(record: dict, u: Sequence[float]) -> str:
    """The caption of ``record`` for the choice vector ``u`` (``N_CHOICES`` uniforms)."""
    ch = _Choices(u)
    bg = record["background"]
    mention = bg != "black" or ch.pick(2) == 1
    lead = ch.pick(2) == 1
    bg_text = f"{ch.one(BG_LEADS)} a {ch.one(BACKGROUND_WORDS[bg])} background"
    prefix = ch.one(PREFIXES)
    groups = _groups(record)
    perms = list(itertools.permutations(range(len(groups))))
    groups = [groups[i] for i in perms[ch.pick(len(perms))]]
    style = ch.one(SEPARATORS)
    parts = [_render_group(g, ch, prefix == "" and k == 0) for k, g in enumerate(groups)]
    if prefix == "there ":
        prefix = "there is " if len(groups[0]["places"]) == 1 else "there are "
    body = prefix + _join(parts, style)
    if not mention:
        return body
    return f"{bg_text}, {body}" if lead else f"{body} {bg_text}"


def make_record(items: list[dict], background: str) -> dict:
    """Canonical record: items sorted by position (POSITIONS order), class names filled in."""
    out = []
    for it in sorted(items, key=lambda it: POSITIONS.index(it["position"])):
        c = int(it["class"])
        out.append({"class": c, "class_name": CLASSES[c], "colour": it["colour"],
                    "size": it["size"], "position": it["position"]})  # fmt: skip
    return {"items": out, "background": background, "count": len(out)}


# -- parsing ----------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*|[,;]")


def _table(pairs) -> list[tuple[tuple[str, ...], object]]:
    """(token tuple, value) sorted longest first, so 'ankle boot' wins over 'boot'."""
    rows = [(tuple(text.split()), value) for text, value in pairs]
    return sorted(rows, key=lambda r: -len(r[0]))


_NOUNS = _table(
    (w, (c, k)) for c, syn in enumerate(NOUNS) for pair in syn for k, w in enumerate(pair)
)
_SIZES = _table((w, s) for s, ws in SIZE_WORDS.items() for w in ws)
_COLOURS = _table((w, c) for c, ws in COLOUR_WORDS.items() for w in ws)
_PLACES = _table((w, p) for p, ws in PLACE_WORDS.items() for w in ws)
_BGS = _table((w, b) for b, ws in BACKGROUND_WORDS.items() for w in ws)
_COUNTS = _table((w, n) for n, ws in COUNT_WORDS.items() for w in ws)
_PREFIXES = _table((p.strip(), p) for p in [*PREFIXES[1:-1], "there is", "there are"])


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _TOKEN.findall(text.lower())
        self.i = 0

    def fail(self, what: str):
        near = " ".join(self.toks[self.i : self.i + 4]) or "end of text"
        raise CaptionParseError(f"cannot parse caption {self.text!r}: expected {what} at {near!r}")

    def peek(self, k: int = 0) -> str | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def match(self, table, what: str | None = None):
        for words, value in table:
            if tuple(self.toks[self.i : self.i + len(words)]) == words:
                self.i += len(words)
                return value
        return self.fail(what) if what else None

    def background(self) -> str | None:
        if self.peek() in BG_LEADS and self.peek(1) == "a":
            self.i += 2
            bg = self.match(_BGS, "a background colour")
            if self.peek() != "background":
                self.fail("'background'")
            self.i += 1
            return bg
        return None

    def places(self, count: int | None) -> list[str]:
        """``count`` places joined by ',' / 'and'; ``None``: as many as follow (a group that
        starts with its places ends them with ', ' + its noun phrase)."""
        out = [self.match(_PLACES, "a position")]
        while count is None or len(out) < count:
            j = self.i
            if self.peek() == ",":
                self.i += 1
            if self.peek() == "and":
                self.i += 1
            if count is None and (self.i == j or not self._place_at(self.i)):
                self.i = j
                break
            out.append(self.match(_PLACES, "a position"))
        return out

    def _place_at(self, i: int) -> bool:
        return any(tuple(self.toks[i : i + len(w)]) == w for w, _ in _PLACES)

    def noun_phrase(self) -> tuple[int, dict]:
        count = self.match(_COUNTS, "a count word (a, one, two, three)")
        size = self.match(_SIZES, "a size word")
        colour = self.match(_COLOURS, "a colour word")
        c, plural = self.match(_NOUNS, "a garment noun")
        if plural != (count > 1):
            self.fail(f"a {'plural' if count > 1 else 'singular'} noun")
        return count, {"class": c, "colour": colour, "size": size}

    def group(self) -> list[dict]:
        if self._place_at(self.i):
            places = self.places(None)
            if self.peek() != ",":
                self.fail("',' after the positions")
            self.i += 1
            count, item = self.noun_phrase()
            if count != len(places):
                self.fail(f"{count} position(s) for count {count}")
        else:
            count, item = self.noun_phrase()
            places = self.places(count)
        return [{**item, "position": p} for p in places]

    def separator(self) -> None:
        if self.peek() in (",", ";"):
            self.i += 1
        if self.peek() == "and":
            self.i += 1


def parse_caption(text: str) -> dict:
    """The record a scenes caption describes (``CaptionParseError`` if it is not one)."""
    p = _Parser(text)
    bg = p.background()
    if bg is not None:
        if p.peek() != ",":
            p.fail("',' after the background")
        p.i += 1
    p.match(_PREFIXES)
    items = p.group()
    while p.peek() is not None:
        if bg is None and (tail := p.background()) is not None:
            bg = tail
            break
        start = p.i
        p.separator()
        if p.i == start:
            p.fail("a separator (',', ';' or 'and')")
        items += p.group()
    if p.peek() is not None:
        p.fail("the end of the caption")
    positions = [it["position"] for it in items]
    if len(set(positions)) != len(positions):
        raise CaptionParseError(f"caption {text!r} puts two items at one position")
    return make_record(items, bg or "black")


# -- comparing ---------------------------------------------------------------------------
def _value(item: dict, field: str):
    return item["class_name"] if field == "class" else item[field]


def record_diff(a: dict, b: dict) -> list[dict]:
    """The fewest attribute changes turning record ``a`` into ``b``.

    Items are matched by the permutation with the fewest differing fields (ties: the first
    in enumeration order); an unmatched item counts as one ``item`` change of weight 4.
    Each change: ``{"item": index in a (or None), "attribute", "from", "to"}``.
    """
    A, B = a["items"], b["items"]
    swap = len(A) > len(B)
    small, large = (B, A) if swap else (A, B)
    best: tuple[int, list] | None = None
    for perm in itertools.permutations(range(len(large)), len(small)):
        pairs = [(j, i) if swap else (i, j) for i, j in enumerate(perm)]
        cost = sum(_value(A[i], f) != _value(B[j], f) for i, j in pairs for f in FIELDS)
        if best is None or cost < best[0]:
            best = (cost, pairs)
    assert best is not None
    pairs = sorted(best[1])
    changes = [
        {"item": i, "attribute": f, "from": _value(A[i], f), "to": _value(B[j], f)}
        for i, j in pairs for f in FIELDS if _value(A[i], f) != _value(B[j], f)
    ]  # fmt: skip
    matched_a, matched_b = {i for i, _ in pairs}, {j for _, j in pairs}
    changes += [{"item": i, "attribute": "item", "from": A[i], "to": None}
                for i in range(len(A)) if i not in matched_a]  # fmt: skip
    changes += [{"item": None, "attribute": "item", "from": None, "to": B[j]}
                for j in range(len(B)) if j not in matched_b]  # fmt: skip
    if a["background"] != b["background"]:
        changes.append({"item": None, "attribute": "background",
                        "from": a["background"], "to": b["background"]})  # fmt: skip
    return changes


def diff_size(changes: list[dict]) -> int:
    """Number of differing attributes (an added / removed item counts 4)."""
    return sum(len(FIELDS) if c["attribute"] == "item" else 1 for c in changes)


def vocabulary_words() -> list[str]:
    """Every word the grammar can emit (sorted)."""
    texts = [w for syn in NOUNS for pair in syn for w in pair]
    for table in (COLOUR_WORDS, SIZE_WORDS, PLACE_WORDS, BACKGROUND_WORDS, COUNT_WORDS):
        texts += [w for ws in table.values() for w in ws]
    texts += [*BG_LEADS, *PREFIXES, "is", "are", "and", "a", "background"]
    return sorted({w for t in texts for w in t.split()})


def _check_tables() -> None:
    assert len(NOUNS) == len(CLASSES) and set(COLOUR_WORDS) == set(COLOURS)
    assert set(SIZE_WORDS) == set(SIZES) and set(PLACE_WORDS) == set(POSITIONS)
    assert set(BACKGROUND_WORDS) == set(BACKGROUNDS)


_check_tables()
