"""Extractive question/answer writing for the smoke endpoint (pure and deterministic; NOT a language model):
`parse_user_message` reads generate's user message, `extractive_pairs` writes pairs whose answers are sentences of
the abstract and whose questions name the title and a phrase of the answer, worded by the focus."""

from __future__ import annotations

import re
from typing import Any

_ABBREV = ("e.g.", "i.e.", "et al.", "cf.", "vs.", "Fig.", "Eq.", "Ref.", "approx.", "resp.")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'$\\])")
_STOP = {"we", "in", "this", "that", "these", "those", "here", "our", "the", "a", "an", "to", "of", "and", "paper",
         "work", "article", "letter", "it", "its", "also", "moreover", "furthermore", "however", "finally", "then",
         "thus", "therefore", "as", "such", "by", "for", "with", "on", "at", "from", "is", "are", "be", "can", "which",
         "show", "shows", "study", "studies", "present", "propose", "introduce", "consider", "demonstrate", "find",
         "further", "additionally", "while", "both", "all", "new", "first", "second", "using", "use", "when", "where",
         "there", "their", "they", "them", "has", "have", "been", "was", "were", "not", "or", "but", "how", "what",
         "into", "one", "two", "than", "more", "most", "very", "well", "same", "other", "so", "do", "does", "if"}
_FOCUS_WORDS = {
    "factual": (),
    "results": ("show", "demonstrat", "find", "found", "achiev", "improv", "outperform", "reduc", "bound", "scal",
                "%", "exponential", "faster", "fidelity", "error", "threshold", "result", "prove", "obtain"),
    "methods": ("method", "approach", "algorithm", "technique", "based on", "using", "we use", "develop", "construct",
                "framework", "protocol", "scheme", "numerical", "simulat", "model", "procedure"),
    "novelty": ("new", "novel", "first", "introduc", "propos", "unlike", "previous", "improv", "extend", "general",
                "open", "unknown", "here we", "in this work", "we present"),
    "definitions": (" is a ", " are ", "defin", "refer", "called", "known as", "describ", "consist", "denote",
                    "which is", "namely", "framework", "concept", "notion"),
}
_STEMS = {
    "factual": ("According to the paper \"{t}\", what is stated about {k}?",
                "What does the paper \"{t}\" say about {k}?",
                "In the paper \"{t}\", what is said regarding {k}?"),
    "results": ("What result does the paper \"{t}\" report concerning {k}?",
                "What does the paper \"{t}\" find about {k}?",
                "Which outcome regarding {k} is reported in the paper \"{t}\"?"),
    "methods": ("How does the paper \"{t}\" approach {k}?",
                "What method or setting does the paper \"{t}\" use for {k}?",
                "How is {k} handled in the paper \"{t}\"?"),
    "novelty": ("What is new in the paper \"{t}\" regarding {k}?",
                "What does the paper \"{t}\" contribute concerning {k}?",
                "Which advance about {k} does the paper \"{t}\" claim?"),
    "definitions": ("How does the paper \"{t}\" describe {k}?",
                    "What is meant by {k} in the paper \"{t}\"?",
                    "How is {k} characterised in the paper \"{t}\"?"),
}
_GARBLED = re.compile(r"[{}<>\\]|start_ARG|end_ARG|&[a-z]+;")
_MARKUP = re.compile(r"[$\\{}<>]|\\[a-zA-Z]+")


def split_sentences(text: str) -> list[str]:
    """Split an abstract into sentences (keeps abbreviations such as `e.g.` inside their sentence)."""
    text = " ".join(text.split())
    for i, abbr in enumerate(_ABBREV):
        text = text.replace(abbr, abbr.replace(".", f"\x00{i}\x00"))
    return [s for part in _SENT_SPLIT.split(text) if (s := re.sub(r"\x00\d+\x00", ".", part).strip())]


_BREAK = {"can", "could", "will", "would", "may", "might", "is", "are", "was", "were", "has", "have", "had", "be",
          "been", "which", "that", "we", "our", "whose", "where", "while", "since", "because", "so", "than", "it",
          "they", "this", "these", "allows", "allow", "enables", "enable", "yields", "leads", "remains", "becomes"}
_TRAIL = {"of", "for", "the", "a", "an", "in", "on", "with", "and", "or", "to", "by", "at", "from", "as", "into"}


def _key_phrase(sentence: str, max_words: int = 7) -> str:
    """A short contiguous phrase of the sentence (a noun phrase, most of the time) for the question to name."""
    clean = re.sub(r"\$[^$]*\$", " , ", sentence)
    tokens = re.findall(r"[A-Za-z][A-Za-z0-9\-]*(?:'[a-z]+)?|[^\sA-Za-z]", _MARKUP.sub(" , ", clean))
    best: list[str] = []
    run: list[str] = []
    for tok in tokens + [","]:
        word = tok[0].isalpha()
        low = tok.lower()
        if word and not run and (low in _STOP or low in _BREAK or low.endswith("ing") or len(tok) < 2):
            continue
        if not word or low in _BREAK or len(run) >= max_words:
            while run and run[-1].lower() in _TRAIL | _STOP:
                run.pop()
            if sum(w.lower() not in _STOP for w in run) >= 2 and not best:
                best = run
            run = []
            continue
        run.append(tok)
    if not best:
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9\-]*", clean) if w.lower() not in _STOP and len(w) > 1]
        best = words[:5]
        if len(best) < 2:
            return ""
    first = best[0]
    if not (first.isupper() or any(c.isupper() for c in first[1:])):
        best[0] = first.lower()
    return " ".join(best)


def _short_title(title: str, limit: int = 160) -> str:
    title = " ".join(title.replace('"', "'").split())
    return title if len(title) <= limit else title[:limit].rsplit(" ", 1)[0]


def _answer_text(sentence: str, limit: int = 2000) -> str:
    if len(sentence) <= limit:
        return sentence
    cut = sentence[:limit]
    return cut[:max(cut.rfind(", "), cut.rfind("; "), 10)].rstrip(",; ") + "."


def extractive_pairs(title: str, abstract: str, focus: str, n: int) -> list[dict[str, str]]:
    """Up to `n` question/answer pairs: answers are abstract sentences, questions name the title and a phrase."""
    focus = focus if focus in _STEMS else "factual"
    title = _short_title(title or "the untitled paper")
    sentences = [s for s in split_sentences(abstract or "") if len(s) >= 20]
    # skip sentences with markup outside LaTeX math (HTML, garbled MathML extraction), unless nothing else is left
    plain = [s for s in sentences if not _GARBLED.search(re.sub(r"\$[^$]*\$", "", s))]
    sentences = plain or sentences
    words = _FOCUS_WORDS[focus]
    order = list(_STEMS).index(focus)

    def score(item: tuple[int, str]) -> tuple:
        i, s = item
        low = f" {s.lower()} "
        hits = sum(w in low for w in words)
        markup = len(_MARKUP.findall(s))
        # rotate the starting sentence by focus so different prompts prefer different sentences
        return (-hits, markup > 0, (i - order) % max(len(sentences), 1))

    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for _, s in sorted(enumerate(sentences), key=score):
        if len(pairs) >= n:
            break
        k = _key_phrase(s)
        if not k:
            continue
        stems = _STEMS[focus]
        for j in range(len(stems)):
            q = stems[(len(pairs) + j) % len(stems)].format(t=title, k=k)
            if q.lower() not in seen and 15 <= len(q) <= 400:
                seen.add(q.lower())
                pairs.append({"question": q, "answer": _answer_text(s)})
                break
    return pairs


def last_block(text: str, tag: str, default: str = "") -> str:
    """The content of the last `<tag>...</tag>` block (text before it may name the markers too)."""
    blocks = re.findall(rf"<{tag}>\s*(.*?)\s*</{tag}>", text, re.S | re.I)
    return blocks[-1] if blocks else default


def parse_user_message(text: str) -> dict[str, Any]:
    """What the generate stage put in its user message: title, abstract, focus, number of pairs."""
    block = last_block(text, "paper", default=text)
    title = re.search(r"^Title:\s*(.+)$", block, re.M)
    abstract = re.search(r"^(?:Abstract|Text):\s*(.*)", block, re.M | re.S)
    focus = re.search(r"Question focus:\s*([A-Za-z_]+)", text)
    n = re.search(r"exactly\s+(\d+)", text)
    return {
        "title": title.group(1).strip() if title else "",
        "abstract": abstract.group(1).strip() if abstract else block,
        "focus": focus.group(1).lower() if focus else "factual",
        "n": max(1, min(int(n.group(1)), 20)) if n else 3,
    }
