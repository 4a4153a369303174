"""What a training image's labels are made of: words of character quads, don't-care regions, and the ICDAR2015
ground-truth format they are read from. Coordinates are source-image pixels on the stored pixel grid
(:mod:`craft_train.imaging`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from craft_train.labels import split_word_quad
from craft_train.synthetic import word_box

__all__ = ["DONT_CARE", "SPLIT_WORD_CONFIDENCE", "Annotation", "Word", "as_word_level", "parse_icdar_gt"]

DONT_CARE = "###"
SPLIT_WORD_CONFIDENCE = 0.5
"""How much the loss trusts a word's even split into characters (the paper's fallback confidence)."""


@dataclass(frozen=True)
class Word:
    """Character quads ``(n, 4, 2)`` of one word and how much the loss trusts them."""

    char_quads: np.ndarray
    confidence: float
    word_level: bool = False
    """Only the word box is known: ``char_quads`` is its even split into ``n`` = transcription length quads."""

    def word_quad(self) -> np.ndarray:
        """The word box of a word-level word (the outline of its even split), top-left first."""
        q = np.asarray(self.char_quads, dtype=np.float64).reshape(-1, 4, 2)
        return np.stack([q[0, 0], q[-1, 1], q[-1, 2], q[0, 3]])


@dataclass(frozen=True)
class Annotation:
    """Everything the labels are made of, in source-image pixel coordinates."""

    words: tuple[Word, ...] = ()
    dont_care: tuple[np.ndarray, ...] = field(default_factory=tuple)


def parse_icdar_gt(text: str) -> Annotation:
    """Parse ICDAR2015 ``x1,y1,...,x4,y4,transcription`` lines.

    The transcription may contain commas; ``###`` (or an empty transcription) marks a
    don't-care region.  Words are split evenly into characters (confidence 0.5, ``word_level``,
    so that weak supervision can replace the split); a one-character transcription is taken as an
    exact character box (confidence 1.0).
    Raises ``ValueError`` on a malformed line.
    """
    words: list[Word] = []
    dont_care: list[np.ndarray] = []
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split(",")
        if len(fields) < 8:
            raise ValueError(f"line {number}: expected 8 coordinates and a transcription, got {line!r}")
        try:
            quad = np.array([float(v) for v in fields[:8]], dtype=np.float64).reshape(4, 2)
        except ValueError:
            raise ValueError(f"line {number}: non-numeric coordinate in {line!r}") from None
        transcription = ",".join(fields[8:]).strip()
        if not transcription or transcription == DONT_CARE:
            dont_care.append(quad)
            continue
        n = len(transcription)
        confidence = 1.0 if n == 1 else SPLIT_WORD_CONFIDENCE
        words.append(Word(split_word_quad(quad, n), confidence, word_level=n > 1))
    return Annotation(tuple(words), tuple(dont_care))


def as_word_level(annotation: Annotation) -> Annotation:
    """What an annotator gives: each word's box, evenly split by its length (one-character words are exact)."""
    words = []
    for word in annotation.words:
        n = len(word.char_quads)
        words.append(Word(split_word_quad(word_box(word.char_quads), n), 1.0 if n == 1 else SPLIT_WORD_CONFIDENCE,
                          word_level=n > 1))
    return Annotation(tuple(words), annotation.dont_care)
