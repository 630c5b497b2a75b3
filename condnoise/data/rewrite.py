"""Caption rewriting for the ``rewrite`` corruption (paper section 2, "text rewrite").

The paper prompted GPT-4 to rewrite captions so they partially mismatch the image, at
five severity levels, one drawn at random per caption. Here a ``Rewriter`` is any
callable ``(caption, severity, rng) -> caption`` with severity in 1..5 and ``rng`` a
``numpy.random.Generator`` (use it for every random choice, so runs are reproducible).

``RuleRewriter`` (built in) swaps entity / attribute words for others from the dataset's
own vocabulary; severity s replaces ``ceil(s / 5 * m)`` of the caption's ``m`` content
words (at least one). An LLM-backed rewriter plugs in the same way (README: "Plugging in an LLM rewriter").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Protocol

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)

# Attribute words (colour, size, material, texture, pattern, count, age, state). Words of a
# caption found here are swapped for other attribute words; other content words are
# treated as entities. Extended at fit time by nothing: the split is lexical.
ATTRIBUTES = frozenset(
    """red orange yellow green blue purple pink brown black white gray grey silver gold golden
    beige navy dark light bright pale colorful colourful striped spotted plaid checked floral
    plain patterned big small large tiny huge little tall short long wide narrow thick thin
    round square wooden metal metallic plastic glass leather cotton wool woolen denim silk
    stone paper fluffy furry shiny wet dry old new young modern vintage empty full open closed
    broken clean dirty hot cold soft hard heavy one two three four five six seven eight nine
    ten several many few single double sleeveless hooded casual formal""".split()
)
STOPWORDS = frozenset(
    """a an the and or of in on at to with without from by for as is are was were be been
    being this that these those it its there their his her he she they them we you i my
    your our some any into onto over under near next behind above below while who which
    what where when how very has have had do does did not no so than then up down out off
    photo picture image view shot close""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


class Rewriter(Protocol):
    """Anything mapping ``(caption, severity 1..5, numpy Generator) -> new caption``."""

    def __call__(self, caption: str, severity: int, rng: np.random.Generator) -> str: ...


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class RuleRewriter:
    """Vocabulary-swap rewriter: entity words -> other entity words, attribute words -> other
    attribute words, both drawn from the dataset's captions (``fit``), falling back to the
    built-in attribute list. Output always differs from the input (case-insensitively)."""

    name = "rule"

    def __init__(self, captions: Iterable[str] = ()) -> None:
        self.entities: list[str] = []
        self.attributes: list[str] = []
        self.fit(captions)

    def fit(self, captions: Iterable[str]) -> RuleRewriter:
        """Collect the entity / attribute vocabulary (sorted, so deterministic) of ``captions``."""
        ents: set[str] = set()
        attrs: set[str] = set()
        for cap in captions:
            for w in _WORD.findall(cap.lower()):
                if w in ATTRIBUTES:
                    attrs.add(w)
                elif w not in STOPWORDS and len(w) > 2:
                    ents.add(w)
        self.entities = sorted(ents)
        self.attributes = sorted(attrs | ATTRIBUTES) if len(attrs) < 2 else sorted(attrs)
        return self

    def _replacement(self, word: str, rng: np.random.Generator) -> str:
        low = word.lower()
        pool = self.attributes if low in ATTRIBUTES else self.entities
        if len(pool) < 2:
            pool = self.attributes
        choices = [w for w in pool if w != low]
        return _match_case(choices[int(rng.integers(len(choices)))], word)

    def __call__(self, caption: str, severity: int, rng: np.random.Generator) -> str:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be in 1..5, got {severity}")
        spans = [
            m for m in _WORD.finditer(caption)
            if m.group().lower() not in STOPWORDS and len(m.group()) > 2
            or m.group().lower() in ATTRIBUTES
        ]  # fmt: skip
        if not spans:
            # Nothing to swap: insert an attribute before the last word (or append one).
            attr = self.attributes[int(rng.integers(len(self.attributes)))]
            words = caption.split()
            if not words:
                return attr
            return " ".join([*words[:-1], attr, words[-1]])
        m = max(1, math.ceil(severity / 5 * len(spans)))
        chosen = sorted(rng.choice(len(spans), size=m, replace=False).tolist())
        out, last = [], 0
        for j in chosen:
            s = spans[j]
            out += [caption[last : s.start()], self._replacement(s.group(), rng)]
            last = s.end()
        out.append(caption[last:])
        return "".join(out)
