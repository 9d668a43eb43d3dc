"""The word sets questions are compared by (dedup across facts, the seen questions' Jaccard check): the project's one
normaliser, `qrb.words`, here for facts.py's import."""

from qrb.words import norm_words, word_set  # noqa: F401 - re-exported
