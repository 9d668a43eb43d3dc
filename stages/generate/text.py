"""The word sets questions are compared by (dedup across facts, the seen questions' Jaccard check)."""

from __future__ import annotations

import re
import unicodedata


def norm_words(text: str) -> list[str]:
    """Casefolded words (NFKC), punctuation dropped."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())


def word_set(text: str) -> frozenset[str]:
    words = norm_words(text)
    return frozenset(words) or frozenset([text.strip().lower()])
