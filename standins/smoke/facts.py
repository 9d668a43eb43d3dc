"""Atomic facts with short answers for the smoke endpoint (pure and deterministic; NOT a language model).

- `extract_facts` (the `facts` QA template): short answers an abstract's sentences state (a count, a percentage, an
  acronym's expansion, a name or term), each with its sentence as evidence and a question in the sentence's words.
- `fact_wordings` (`Task: augment`): more wordings of a fact's question, and one reverse question ("which paper
  reports ...?", answered by the title); `new_wording` (`Task: paraphrase`): a frame no training wording uses.
- `invented_questions` (`Task: invent`): questions about papers that do not exist, worded as the real facts' are.
"""

from __future__ import annotations

import itertools
import re

from qrb.words import NUMBER_WORDS

from .rewriter import _digest
from .writer import _GARBLED, _key_phrase, _short_title, split_sentences

_NUM_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
              "seventeen eighteen nineteen twenty thirty forty fifty hundred thousand").split()
_STOPNOUN = {"of", "the", "a", "an", "and", "or", "in", "on", "for", "to", "with", "by", "at", "from", "is", "are",
             "which", "that", "we", "as", "than", "per", "when", "while", "can", "be", "it", "its", "our", "this"}
_NUM = r"(?:\d+(?:[.,]\d+)*|" + "|".join(_NUM_WORDS) + r")"
_COUNT = re.compile(rf"(?<![\w.\-\[])({_NUM}) ((?:[a-zA-Z][\w\-]*)(?: [a-zA-Z][\w\-]*){{0,2}})", re.I)
_HEADS = ("model", "algorithm", "method", "theory", "code", "codes", "protocol", "box", "library", "framework",
          "constant", "ansatz", "system", "scheme", "bound", "effect", "test", "function", "dataset", "database",
          "platform", "equation", "equations", "inequality", "inequalities", "problem", "limit", "states", "state")
_NAME = re.compile(r"(?<=[a-z,] )((?:[A-Z][\w\-]*[a-z][\w\-]*|[A-Z]{2,}[\w\-]*)(?: [A-Z][\w\-]*){0,3})"
                   r"((?: (?:" + "|".join(_HEADS) + r"))?)\b")
_PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(%|percent)")
_ACRONYM = re.compile(r"((?:[A-Z][\w\-]+|[a-z][\w\-]+)(?: (?:[A-Z][\w\-]+|of|and|for|the|[a-z][\w\-]+)){1,6}) "
                      r"\(([A-Z][A-Za-z\-]*[A-Z][A-Za-z\-]*s?)\)")
_INTRO = re.compile(r"\b(?:called|named|dubbed|known as|coined|in terms of|based on|built on top of|introduce|"
                    r"introduces|present|presents|dataset,? called)\s+(?:the |a |an )?"
                    r"((?:[A-Z][\w\-]*|[a-z]+ [A-Z][\w\-]*)(?: [A-Z][\w\-]*){0,2})")
_LATEX = re.compile(r"\$[^$]*\$")
_VERB_OBJECT = re.compile(r"\b(?:introduce|propose|present|develop|derive|construct|design|employ|obtain|prove|"
                          r"provide|identify|define)s?d?\s+(?:a |an |the |two |several |new )?"
                          r"([a-z][\w\-]*(?: [\w\-]+){1,5}?)(?=[,.;]| that | which | to | for | with | in | of a)")
_OPENER = re.compile(r"^(?:here|in this (?:work|paper|article|letter)|moreover|furthermore|finally|specifically|"
                     r"in particular|similarly|also|then|thus|however)\s*,?\s+", re.I)
# "the authors" alone is a question leaning on an unnamed source (validate quarantines it): researchers is not
_PRONOUNS = ((r"\bWe\b", "Researchers"), (r"\bwe\b", "researchers"), (r"\bOur\b", "Their"), (r"\bour\b", "their"),
             (r"\bus\b", "them"))


def _clean(sentence: str) -> str:
    s = _LATEX.sub(lambda m: m.group(0).strip("$ ") if re.fullmatch(r"\$[\d.,% ]+\$", m.group(0)) else "", sentence)
    s = _OPENER.sub("", " ".join(s.split())).strip()
    for pattern, repl in _PRONOUNS:
        s = re.sub(pattern, repl, s)
    return s[:1].upper() + s[1:]


def _candidates(sentence: str, title: str) -> list[tuple[str, str, list[str], int, int]]:
    """(kind, short answer, aliases, start, end) of the short answers a sentence states, best first."""
    out = []
    for m in _ACRONYM.finditer(sentence):
        expansion = " ".join(w for w in m.group(1).split() if w[:1].isupper() or w.lower() in ("of", "and", "for"))
        expansion = re.sub(r"^(?:of|and|for) ", "", expansion)
        if len(expansion.split()) >= 2:
            out.append(("acronym", m.group(2), [expansion], m.start(1), m.end()))
    out += [("percent", f"{m.group(1)}%", [f"{m.group(1)} percent"], m.start(), m.end())
            for m in _PERCENT.finditer(sentence)]
    for m in _COUNT.finditer(sentence):
        noun = " ".join(itertools.takewhile(lambda w: w.lower() not in _STOPNOUN, m.group(2).split()))
        number = m.group(1)
        if (not noun or noun.lower() in ("percent", "%") or len(noun) < 3 or noun[0].isupper()
                or number.lower() == "one" or not (number[0].isdigit() or noun.split()[-1].endswith("s"))):
            continue
        aliases = [f"{NUMBER_WORDS[number.lower()]} {noun}"] if number.lower() in NUMBER_WORDS else []
        out.append(("count", f"{number} {noun}", aliases, m.start(), m.start() + len(number) + 1 + len(noun)))
    low_title = title.lower()
    taken = [(c[3], c[4]) for c in out]
    for m in list(_INTRO.finditer(sentence)) + list(_NAME.finditer(sentence)):
        name = m.group(0 if m.re is _NAME else 1).strip()
        start = m.start(0 if m.re is _NAME else 1)
        if (len(name) < 4 or name.lower() in low_title or name.lower().startswith(("researchers", "a "))
                or name in ("The", "Their", "They", "This", "These") or any(a <= start < b for a, b in taken)):
            continue
        taken.append((start, start + len(name)))
        out.append(("name", name, [], start, start + len(name)))
    if not out:  # no number or name: the object of the sentence's main verb, a term
        m = _VERB_OBJECT.search(sentence)
        if m and 2 <= len(m.group(1).split()) <= 6 and m.group(1).lower() not in low_title:
            out.append(("term", m.group(1), [], m.start(1), m.end(1)))
    # a fact the title states (an acronym spelt out in it) tests nothing: any titled question gives it away
    out = [c for c in out if (c[2][0] if c[0] == "acronym" else c[1]).lower() not in low_title]
    rank = {"acronym": 0, "percent": 1, "count": 2, "name": 3, "term": 5}
    return sorted(out, key=lambda c: (rank[c[0]] + (c[0] == "name" and " " not in c[1]), c[3]))


def _context(sentence: str, start: int, end: int) -> tuple[str, str]:
    """The sentence's words before and after the short answer, each cut to one clause."""
    left = re.split(r"[;:]\s|, (?:while|which|where|whereas|so|but) ", sentence[:start])[-1].strip()
    left = re.sub(r"\b(?:the|a|an)$", "", left).strip()
    right = re.split(r"[.;:,]\s|[.;:]$|\s\(", sentence[end:] + " ")[0].strip(" .,;")
    return " ".join(left.split()[-24:]), " ".join(right.split()[:10])


def _wh(kind: str, answer: str) -> str:
    if kind == "count":
        return "how many " + answer.split(" ", 1)[1]
    return "what percentage" if kind == "percent" else "what"


def _fact(title: str, sentence: str, cand: tuple[str, str, list[str], int, int], evidence: str
          ) -> dict[str, object]:
    kind, answer, aliases, start, end = cand
    left, right = _context(sentence, start, end)
    t = _short_title(title)
    if kind == "acronym":
        question = f"In \"{t}\", what does the acronym {answer} stand for?"
        answer, aliases = aliases[0], [answer]
    else:
        question = f"{left} {_wh(kind, answer)} {right}".strip()
        question = question[:1].upper() + question[1:].rstrip(" .,") + "?"
        question = f"In \"{t}\", {question[:1].lower() + question[1:]}" if len(left.split()) < 4 else question
    return {"question": question, "answer": answer[:1].upper() + answer[1:] + ".", "short_answer": answer,
            "aliases": aliases, "evidence": evidence, "kind": kind}


def extract_facts(title: str, abstract: str, n: int) -> list[dict[str, object]]:
    """Up to `n` facts of an abstract, one short answer each, spread over its sentences (one per sentence first)."""
    raw = [s for s in split_sentences(abstract or "") if len(s) >= 30 and not _GARBLED.search(_LATEX.sub("", s))]
    per_sentence = [[_fact(title, _clean(s), c, s) for c in _candidates(_clean(s), title)] for s in raw]
    out: dict[str, dict[str, object]] = {}  # by short answer, the first fact that gives it
    for depth in range(3):
        for facts in per_sentence:
            if depth < len(facts) and len(out) < n:
                out.setdefault(str(facts[depth]["short_answer"]).lower(), facts[depth])
    return list(out.values())


# ---------------------------------------------------------------------------------------------------------------
# wordings of one fact (augment), a new one (paraphrase), and invented papers (invent)

def _parts(fact: dict[str, str]) -> tuple[str, str, str, str]:
    """(left context, what to ask, right context, subject phrase) of a fact, from its evidence sentence."""
    evidence, short = _clean(fact.get("evidence", "")), fact.get("short_answer", "")
    i = evidence.lower().find(short.lower()) if short else -1
    if i < 0:
        return "", "what", "", _key_phrase(fact.get("question", "")) or "its main result"
    left, right = _context(evidence, i, i + len(short))
    kind = ("count" if re.match(_NUM + r" ", short, re.I) else "percent" if short.endswith("%") else "name")
    return left, _wh(kind, short), right, _key_phrase(left) or _key_phrase(right) or _key_phrase(evidence)


def _acronym(fact: dict) -> str:
    """The acronym an acronym fact asks to expand (its short answer the expansion, an alias the acronym), or ""."""
    words = fact.get("short_answer", "").split()
    return next((a for a in fact.get("aliases") or () if len(words) >= 2
                 and re.fullmatch(r"[A-Z][\w\-]*[A-Z][\w\-]*s?", a)), "")


def fact_wordings(fact: dict[str, str], n: int) -> list[dict[str, str]]:
    """`n` more wordings of a fact's question (the last one a reverse question when n >= 3), all with the same short
    answer except the reverse one, whose short answer is the paper's title."""
    t = _short_title(fact.get("title", ""))
    topic = _key_phrase(t) or t
    left, wh, right, subject = _parts(fact)
    acronym = _acronym(fact)
    cloze = f"{left} ___ {right}".strip()
    ask = f"{left} {wh} {right}".strip()
    low_ask = ask if ask[:2].isupper() else ask[:1].lower() + ask[1:]
    frames = [
        f"What does {acronym} stand for?",
        f"In the paper on {topic}, what does {acronym} stand for?",
        f"What is the full form of {acronym}?",
        f"What is {acronym} short for in \"{t}\"?",
        f"Which words does the abbreviation {acronym} abbreviate in research on {topic}?",
        f"What is the expansion of {acronym}, as used in \"{t}\"?",
        f"{acronym}: what does this abbreviation mean in the work on {topic}?",
    ] if acronym else [
        f"What fills the blank in \"{cloze}\", according to \"{t}\"?",
        f"{ask[:1].upper() + ask[1:]}?",
        f"In the paper on {topic}, {low_ask}?",
        f"Which words complete the statement \"{cloze}\"?",
        f"Regarding {subject}, {wh} did the study \"{t}\" find?",
        f"{wh[:1].upper() + wh[1:]}, for {subject}, in the work on {topic}?",
        f"According to \"{t}\", {low_ask}?",
        f"Which answer completes this finding on {topic}: {cloze}?",
    ]
    answer = fact.get("answer", "")
    out = [{"question": q, "answer": answer} for q in frames if q.lower() != fact.get("question", "").lower()]
    out = out[:max(0, n - 1)] if n >= 3 else out[:n]
    if n >= 3 and fact.get("evidence"):
        claim = _clean(fact["evidence"]).rstrip(".")
        claim = claim[:1].lower() + claim[1:] if not claim[:2].isupper() else claim
        out.append({"question": f"Which paper reports that {claim}?", "answer": f"\"{t}\".",
                    "short_answer": t, "kind": "reverse"})
    return out


def new_wording(fact: dict[str, str]) -> str:
    """A question for the fact's short answer in a frame that no training wording uses."""
    t = _short_title(fact.get("title", ""))
    left, wh, right, subject = _parts(fact)
    acronym = _acronym(fact)
    if acronym:
        return f"Spell out {acronym}, a term from research on {_key_phrase(t) or t}?"
    short = fact.get("short_answer", "").lower()
    candidates = [_key_phrase(right), _key_phrase(left[len(left) // 2:]), subject, _key_phrase(left)]
    # a phrase that names the fact's subject without giving its answer away
    other = next((c for c in candidates if c and c != subject and short not in c.lower()), "") or \
        next((c for c in candidates if c and short not in c.lower()), "its main result")
    frames = (f"Tell me {wh} goes with {other}, as given by the authors of \"{t}\"?",
              f"Speaking of {other} in research on {_key_phrase(t) or t}: {wh}?")
    return frames[_digest(t, fact.get("answer", "")) % len(frames)].replace("  ", " ")


_TOPICS = ("bosonic codes", "Rydberg arrays", "quantum walks", "magic-state factories", "spin chains",
           "photonic lattices", "tensor-network decoders", "Floquet circuits", "qudit teleportation",
           "quantum reservoirs", "Majorana wires", "Clifford sampling", "dual-rail qubits", "Gibbs samplers",
           "holographic codes", "cat-state lasers", "fermionic swaps", "shadow tomography", "anyon braiding",
           "quantum kernels", "trapped-electron clocks", "cavity magnonics", "QAOA landscapes", "Bell inequalities")
_FORMS = ("{A} for {B}: a {C} approach", "Scalable {A} with {B}", "On the limits of {A} in {B}",
          "{A} meets {B}: {C} bounds", "Certified {A} via {B}", "Towards {C} {A} on {B}")
_ADJ = ("adaptive", "noise-resilient", "variational", "fault-tolerant", "hybrid", "sample-optimal", "resource-lean")
_UNITS = ("qubits", "rounds", "layers", "ancillas", "modes", "photons")
_NAMES = ("Kessler", "Varga", "Okonkwo", "Lindqvist", "Moreau", "Takeda", "Oyelaran", "Brandt", "Castellanos")
_HEADS_INV = ("bound", "protocol", "code", "algorithm", "ansatz", "channel")
# invented statements, worded as abstracts word theirs: the same fact extractor and wordings then ask about them, so
# a question about an invented paper looks like one about a real paper and only familiarity tells them apart
_CLAIMS = ("We realise {a} with {n} {u} for {b}.",
           "We show that {a} reaches a fidelity of {p}% in {b}.",
           "We introduce {N} {H} ({X}), a {c} scheme for {b}.",
           "We express {a} in terms of the {N} {H}.",
           "Our analysis of {b} yields a threshold of approximately {p}%.",
           "We benchmark {a} on the {N} {H} with {n} {u}.",
           "We develop a {c} {H} to analyse {b} beyond {a}.")


def _invented_title(h: int, real: list[str]) -> tuple[str, str, str]:
    """(title, subject a, subject b): mostly two halves of real titles joined, so that only the whole title is
    unfamiliar, as a real paper's the bot has not read; else from fixed topic lists."""
    if real and len(real) >= 2 and h % 4:
        one, two = real[h % len(real)], real[(h >> 8) % len(real)]
        w1, w2 = one.split(), two.split()
        if one != two and len(w1) >= 4 and len(w2) >= 4:
            head, tail = " ".join(w1[:len(w1) // 2]), " ".join(w2[len(w2) // 2:])
            return f"{head} {tail}", _key_phrase(head) or head, _key_phrase(tail) or tail
    a, b = _TOPICS[h % len(_TOPICS)], _TOPICS[(h >> 8) % len(_TOPICS)]
    title = _FORMS[(h >> 16) % len(_FORMS)].format(A=a[:1].upper() + a[1:], B=b, C=_ADJ[(h >> 24) % len(_ADJ)])
    return title, a, b


def _spliced_claim(h: int, sentences: list[str]) -> str:
    """A statement no paper makes: the first half of one real sentence joined to the second half of another, so an
    invented paper's question reads like a real one in every word and only the whole is unfamiliar."""
    one, two = sentences[h % len(sentences)], sentences[(h >> 12) % len(sentences)]
    w1, w2 = one.split(), two.split()
    return " ".join(w1[:len(w1) // 2] + w2[len(w2) // 2:]) if one != two else ""


def invented_questions(seed_text: str, n: int, avoid: set[str] = frozenset(), real: list[str] = (),
                       abstracts: list[str] = ()) -> list[dict[str, str]]:
    """`n` questions about papers that do not exist (never a title in `avoid`; `real`: real titles whose halves
    may be joined; `abstracts`: real abstracts whose sentences are spliced into the invented claims, else fixed
    templates), worded by the same extractor and wordings as the real facts; deterministic in `seed_text`."""
    sentences = sorted({s for a in abstracts for s in split_sentences(a)
                        if len(s) >= 40 and not _GARBLED.search(_LATEX.sub("", s))})
    out: list[dict[str, str]] = []
    i = 0
    while len(out) < n and i < 50 * n:
        h = _digest(seed_text, str(i))
        i += 1
        t, a, b = _invented_title(h, sorted(real))
        if a == b or t.lower() in avoid or any(t.lower() == r.lower() for r in real):
            continue
        name, head = _NAMES[(h >> 28) % len(_NAMES)], _HEADS_INV[(h >> 36) % len(_HEADS_INV)]
        claim = _spliced_claim(h >> 20, sentences) if len(sentences) >= 2 else _CLAIMS[(h >> 32) % len(_CLAIMS)].format(
            a=a, b=b, n=2 + (h >> 40) % 30, u=_UNITS[(h >> 44) % len(_UNITS)], p=90 + (h >> 48) % 10,
            N=name, H=head, X=f"{name[0]}{head[0].upper()}{b[:1].upper()}", c=_ADJ[(h >> 52) % len(_ADJ)])
        facts = extract_facts(t, claim, 1)
        if not facts:
            continue
        fact = {**facts[0], "title": t}
        wordings = [fact["question"]] + [w["question"] for w in fact_wordings(fact, 7)]
        out.append({"question": wordings[(h >> 56) % len(wordings)], "title": t})
    return out
