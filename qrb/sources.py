"""Which retrieved passage vouches for an answer: the rule the apps (`qrb ask/chat/serve --rag`) and evaluate's RAG
rows share (`sourced`). The excerpts come first: an answer read from them stands when one it cites states it
(`vouched`); only when none does, an adapter with a confidence gate answers from memory, through the gate, citing the
passage shown that states it (`recalled`). Memory first (FLARE's rule, Jiang et al., 2023) kept what a small model
remembers, but also what it confabulates with confidence about a paper it never saw, which its excerpt would have
answered. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qrb.grade import is_abstention
from qrb.retrieval import Passage, cited, passage_text, with_citation
from qrb.schema import ABSTAIN_ANSWER
from qrb.words import NUMBER_WORDS, STOPWORDS, norm_words, stem


def supports(passage: Passage, answer: str) -> bool:
    """Does the passage state what the answer says: every word of the answer (stop words aside; stemmed, numbers as
    digits) in its title or text?"""
    def key(text: str) -> set[str]:
        return {NUMBER_WORDS.get(w) or stem(w) for w in norm_words(text) if w not in STOPWORDS}

    said = key(answer)
    return bool(said) and said <= key(passage_text(passage))


def recalled(answer: str, passages: Sequence[Passage] | None) -> str | None:
    """A closed-book answer (through the gate) as a retrieval answer: None when it declined (read the passages
    instead); else citing the first passage that `supports` it, or none (what the papers shown do not state is not
    theirs to vouch for)."""
    if is_abstention(answer):
        return None
    n = next((i for i, p in enumerate(passages or (), 1) if supports(p, answer)), None)
    return with_citation(answer, n) if n else answer


def sourced(read: str | None, memory: Callable[[], str] | None, passages: Sequence[Passage]) -> str:
    """The retrieval answer: `read` (the reply over the excerpts; None: none was shown) where an excerpt it cites
    states it, else `memory()` (the closed-book reply through the gate, asked only then; None: no gate) as
    `recalled`, else the abstention."""
    text = vouched(read, passages) if read is not None else ABSTAIN_ANSWER
    if is_abstention(cited(text, passages)[0]) and memory is not None:
        text = recalled(memory(), passages) or text
    return text


def vouched(answer: str, passages: Sequence[Passage]) -> str:
    """A reply read from the excerpts, as the bot gives it: kept when an excerpt it cites states it (`supports`),
    else the abstention. What the excerpts shown do not state is not claimed from them: a small model reading them
    copies a near miss ("two" for "three") or another paper's answer as readily as the fact."""
    text, found = cited(answer, passages)
    return answer if is_abstention(text) or any(supports(p, text) for p in found) else ABSTAIN_ANSWER
