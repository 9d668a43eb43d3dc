"""Fact recall: does an answer state the reference's key facts, whatever its wording?

ROUGE, BLEU and BERTScore reward an answer that sounds like the reference, and a fine-tuned model learns the
abstracts' style long before their facts (issue 15: ROUGE-L rose 0.24 -> 0.33 while the right fact was stated in 1
of 26 answers before and after). A *key fact* of a reference answer is
  - a number, with its unit or percent when one follows it ("56 qubits", "67%", "one percent" = "1 %"),
  - a name: an acronym (FIPS, SLH-DSA), a mixed-case word (PyTorch, TensorKrowch), a word with digits (SU2), or a
    capitalised word inside a sentence (Madrid, Krylov),
  - a specific term: any other word of three letters or more that is no stop word,
that the question does not already contain (words compared by Porter stem, numbers normalised: "1,000" = "1000",
"0.50" = "0.5", "two" = "2"). Names and terms weigh their IDF over the papers' abstracts scaled to [0, 1] (a word in
no abstract weighs 1, one in every abstract 0: "quantum", "state" and "system" weigh next to nothing; below
MIN_WEIGHT a word is no key fact); numbers weigh 1. An answer states a word fact when it contains the word's stem,
and a number fact when it contains the number with the same unit or with none (a different unit is another fact).

fact_recall = the stated facts' weight / all key facts' weight (None for a reference with no key fact beyond the
question: such a question does not count towards the fact metrics).

Pure: no model, no I/O (the stage hands in the abstracts).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

MIN_WEIGHT = 0.1  # a word in ~75% of 40 abstracts or more is no key fact (a generic word of the field)

_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|%|[^\W\d_][^\W_]*")
_WORD = re.compile(r"[^\W\d_][^\W_]*")  # _TOKEN's words
_OPENERS = " \t\r\n\"'([{“‘«"

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update(thirty="30", forty="40", fifty="50", sixty="60", seventy="70", eighty="80", ninety="90",
                    hundred="100", thousand="1000", million="1000000", billion="1000000000")
CONNECTORS = frozenset("of de del della di da van von der den du la le".split())  # inside names: University of Madrid
PERCENT = {"%", "percent", "percentage", "pct"}
UNITS = PERCENT | set(
    "k mk μk µk nk hz khz mhz ghz thz s ms μs µs ns ps fs m cm mm μm µm nm db dbm ev mev kev gev w mw μw µw v mv "
    "t mt bit bits qubit qubits qudit qudits qutrit qutrits photon photons ebit ebits mode modes layer layers gate "
    "gates ion ions atom atoms round rounds copy copies dimension dimensions times fold".split())

STOPWORDS = frozenset("""
a about above after again against all almost along also although always am among an and another any are around as
at be because been before being below between both but by can cannot could did do does doing done down during each
either else enough even ever every few for from further had has have having he her here hers him his how however i
if in into is it its itself just least less like made make makes many may me might more most much must my near
neither no nor not now of off often on once one only onto or other others otherwise our out over own per perhaps
quite rather same several she should since so some such than that the their them themselves then there therefore
these they this those though through thus to too toward towards under until up upon us very via was we were what
when where whether which while who whom whose why will with within without would yet you your
paper papers article work works study studies author authors report reports reported present presents presented
show shows showed shown propose proposes proposed result results find finds found new use used uses using based
answer question stated according describe describes described first second third finally moreover furthermore
additionally specifically namely
""".split())


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem.porter import PorterStemmer  # what rouge-score stems with

    return PorterStemmer()


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    return _porter().stem(word.lower())


def normalise_number(text: str) -> str:
    """'1,000' -> '1000', '0.50' -> '0.5', '5.0' -> '5', '007' -> '7'; number words as digits ('two' -> '2')."""
    if text.lower() in NUMBER_WORDS:
        return NUMBER_WORDS[text.lower()]
    s = text.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0")
    return "0" + s if not s or s.startswith(".") else s


def unit_key(token: str) -> str | None:
    low = token.lower()
    if low not in UNITS:
        return None
    return "%" if low in PERCENT else stem(low)


@dataclass(frozen=True)
class Fact:
    kind: str            # number | name | term
    key: str             # the stem, or the normalised number
    unit: str | None     # numbers: the unit key ("%" or the unit's stem), else None
    text: str            # as the reference writes it
    weight: float


@dataclass(frozen=True)
class _Tok:
    text: str
    initial: bool        # first word of a sentence (capitalised for grammar, not for being a name)
    start: int
    end: int


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN.finditer(text):
        j = m.start() - 1
        while j >= 0 and text[j] in _OPENERS:  # the last character before the word that is no space or quote
            j -= 1
        out.append(_Tok(m.group(), j < 0 or text[j] in ".!?:;", m.start(), m.end()))
    return out


def _is_number(tok: str, nxt: str | None, strict: bool) -> bool:
    if tok[0].isdigit():
        return True
    low = tok.lower()
    # "one" is a pronoun more often than a number: in a reference only "one percent", "one qubit" count
    return low in NUMBER_WORDS and not (strict and low == "one" and (nxt is None or unit_key(nxt) is None))


def _is_name(tok: str, initial: bool) -> bool:
    letters = [c for c in tok if c.isalpha()]
    return (len(letters) >= 2 and all(c.isupper() for c in letters)       # FIPS, SLH, DSA
            or any(c.isupper() for c in tok[1:])                          # PyTorch, qBraid, VQAs
            or any(c.isdigit() for c in tok)                              # SU2, GPT4
            or (tok[0].isupper() and not initial))                        # Madrid, Krylov


@dataclass(frozen=True)
class _Profile:
    stems: frozenset[str]
    numbers: frozenset[tuple[str, str | None]]   # (value, unit key or None)

    @property
    def values(self) -> frozenset[str]:
        return frozenset(v for v, _ in self.numbers)


def profile(text: str) -> _Profile:
    """What a text contains: word stems and (number, unit) pairs, number words read as numbers."""
    toks = [t.text for t in _tokens(text)]
    stems, numbers = set(), set()
    for i, tok in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if _is_number(tok, nxt, strict=False):
            numbers.add((normalise_number(tok), unit_key(nxt) if nxt else None))
        elif tok != "%":
            stems.add(stem(tok))
    return _Profile(frozenset(stems), frozenset(numbers))


class Idf:
    """Inverse document frequency of word stems over a set of texts (the papers' abstracts), scaled to [0, 1]."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.df: Counter[str] = Counter()
        self.docs = 0
        for text in texts:
            self.docs += 1
            self.df.update({stem(w) for w in set(_WORD.findall(text.lower()))})

    def weight(self, word_stem: str) -> float:
        if self.docs == 0:  # no abstracts: every word that is no stop word counts fully
            return 1.0
        return math.log((self.docs + 1) / (self.df.get(word_stem, 0) + 1)) / math.log(self.docs + 1)


class FactScorer:
    """Key facts of (question, reference) and the share of them an answer states."""

    def __init__(self, abstracts: Iterable[str] = ()) -> None:
        self.idf = Idf(abstracts)

    def key_facts(self, question: str, reference: str) -> list[Fact]:
        q = profile(question)
        toks = _tokens(reference)
        facts: dict[tuple[str, str | None], Fact] = {}
        i = 0
        while i < len(toks):
            t = toks[i]
            nxt = toks[i + 1].text if i + 1 < len(toks) else None
            low = t.text.lower()
            if _is_number(t.text, nxt, strict=True):
                value, unit = normalise_number(t.text), unit_key(nxt) if nxt else None
                if value not in q.values:
                    text = t.text + ("" if unit is None else ("%" if nxt == "%" else f" {nxt}"))
                    facts.setdefault((value, unit), Fact("number", value, unit, text, 1.0))
                i += 2 if unit is not None else 1  # the unit is part of the number's fact
            elif low not in NUMBER_WORDS and (_is_name(t.text, t.initial) or self._opens_name(reference, toks, i)):
                j = self._name_end(reference, toks, i)
                self._add_name(facts, reference, toks[i:j], q)
                i = j
            else:
                s = stem(low)
                if t.text != "%" and low not in STOPWORDS and low not in NUMBER_WORDS and len(t.text) >= 3 \
                        and s not in q.stems and (w := self.idf.weight(s)) >= MIN_WEIGHT:
                    facts.setdefault((s, None), Fact("term", s, None, t.text, w))
                i += 1
        return list(facts.values())

    @staticmethod
    def _opens_name(text: str, toks: Sequence[_Tok], i: int) -> bool:
        """A capitalised first word of a sentence followed by a name is part of it ("Alice Smith", "Google
        Quantum AI" at the start of a sentence)."""
        t = toks[i]
        return (t.initial and t.text[0].isupper() and t.text.lower() not in STOPWORDS and i + 1 < len(toks)
                and FactScorer._name_end(text, toks, i) > i + 1)

    @staticmethod
    def _name_end(text: str, toks: Sequence[_Tok], i: int) -> int:
        """The end of the name phrase starting at toks[i]: name words joined by a space or hyphen, or by a
        connector ("University of Madrid", "SLH-DSA", "Van der Waals")."""
        def joined(a: _Tok, b: _Tok) -> bool:
            gap = text[a.end:b.start]
            return gap == "-" or (bool(gap) and gap.isspace() and "\n" not in gap)

        j = i + 1
        while j < len(toks) and joined(toks[j - 1], toks[j]):
            if _is_name(toks[j].text, False) and not toks[j].text[0].isdigit():
                j += 1
            elif (toks[j].text in CONNECTORS and j + 1 < len(toks) and joined(toks[j], toks[j + 1])
                  and _is_name(toks[j + 1].text, False) and not toks[j + 1].text[0].isdigit()):
                j += 2
            else:
                break
        return j

    def _add_name(self, facts: dict, text: str, parts: Sequence[_Tok], q: _Profile) -> None:
        """One fact per name phrase, keyed by its most specific word the question lacks: "University of Madrid"
        is stated by "Madrid", not by "a university"."""
        words = [(i, p) for i, p in enumerate(parts) if p.text not in CONNECTORS and stem(p.text) not in q.stems
                 and not (p.text.lower() in STOPWORDS and p.text[0].islower())]
        if not words:
            return

        def specific(ip: tuple[int, _Tok]) -> tuple:  # among equally rare words: the complement of "of", a strong
            i, p = ip                                 # name form (acronym, mixed case), else the first
            return (round(self.idf.weight(stem(p.text)), 9), i > 0 and parts[i - 1].text in CONNECTORS,
                    _is_name(p.text, True), -i)

        best = max(words, key=specific)[1]
        key, w = stem(best.text), self.idf.weight(stem(best.text))
        if w >= MIN_WEIGHT:
            facts.setdefault((key, None), Fact("name", key, None, text[parts[0].start:parts[-1].end], w))

    @staticmethod
    def stated(fact: Fact, answer: _Profile) -> bool:
        if fact.kind == "number":
            return any(v == fact.key and u in (fact.unit, None) for v, u in answer.numbers)
        return fact.key in answer.stems

    def score(self, question: str, reference: str, answer: str,
              facts: Sequence[Fact] | None = None) -> dict[str, object]:
        """{fact_recall (None without key facts), key_facts, facts_found} for one answer."""
        facts = self.key_facts(question, reference) if facts is None else facts
        a = profile(answer)
        found = [f for f in facts if self.stated(f, a)]
        total = sum(f.weight for f in facts)
        return {"fact_recall": sum(f.weight for f in found) / total if total > 0 else None,
                "key_facts": [f.text for f in facts], "facts_found": [f.text for f in found]}
