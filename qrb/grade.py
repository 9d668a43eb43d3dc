"""Short-answer grading, offline and deterministic: an answer is correct, incorrect or not attempted against the
question's short gold answer (SimpleQA's grades).

- correct: every part of the gold (or of an alias) is stated plainly: not negated ("not 56 qubits"), not asked ("56
  qubits?"), not a citation ("Ref. [56]"), with no rival candidate beside it (a list, range or hedge of values: "53 or
  56 qubits", "SLH-DSA or ML-DSA"); hedging words alone ("I think") do not matter;
- not_attempted: the answer declines ("I don't know that paper", "I'm not sure") and offers no candidate;
- incorrect: anything else. Without a gold (a question about a paper that does not exist) any attempt is invented.

Numbers match by value within the gold's written precision (half its last digit; 1% for words and powers):
"twenty-one" = 21, "two thirds" = 67%, 0.995 = 99.5%, 1,000 = 1000, 1e-3 = 10^-3 = 0.001; units must agree where both
sides give one ("127 qubits" states "127 superconducting qubits"); "more than 56" is not 56; a value the question
contains is context, not a rival. Names match by their distinctive words ("Madrid" states "University of Madrid";
case, hyphens and plurals aside; a lone letter like "N" is no name), terms by Porter stem, a formula by its symbols in
order. Pure: no I/O; the word tables, units and stemmer are in `words`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from .words import CONNECTORS, NUMBER_WORDS, STOPWORDS, UNITS, stem, unit_key

CORRECT, INCORRECT, NOT_ATTEMPTED = "correct", "incorrect", "not_attempted"

_SMALL = {w: int(v) for w, v in NUMBER_WORDS.items() if int(v) < 100}
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9}
_FRACTIONS = {"half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4, "fourth": 4, "fourths": 4,
              "fifth": 5, "fifths": 5, "tenth": 10, "tenths": 10}
# words that do not tell one name from another: "University of Madrid" is stated by "Madrid"
GENERIC = frozenset("university institute department laboratory lab center centre school college inc corp company "
                    "quantum algorithm algorithms framework library protocol method scheme model code theorem ansatz "
                    "state states gate network circuit function equation standard system approach technique".split())
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_PLAIN = str.maketrans({"−": "-", "–": "-", "—": " - ", "’": "'", "‘": "'", "×": "x", "·": "x", "“": '"', "”": '"'})

_NUM = re.compile(r"""(?<![\w.^])(?:
    (?P<m>\d+(?:\.\d+)?)\s*[x*]\s*10\s*(?:\^|\*\*)\s*\{?(?P<e>[-+]?\d+)\}?      # 1.5 x 10^-3
  | 10\s*(?:\^|\*\*)\s*\{?(?P<pe>[-+]?\d+)\}?                                   # 10^-3
  | (?P<em>\d+(?:\.\d+)?)[eE](?P<ee>[-+]?\d+)                                   # 1e-3
  | (?P<fn>\d+)\s*/\s*(?P<fd>\d+)(?![\d.])                                      # 2/3
  | (?P<d>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)                            # 1,000  0.995  56
  )(?P<pct>\s*%)?""", re.X)
_WORD = r"[^\W\d_][\w+]*(?:[-'][\w+]+)*|\d+[^\W\d_][\w+]*"
_WORD_RE = re.compile(_WORD)
_GROUP_GAP = re.compile(r"(?:\s*(?:,|/|-|\.\.\.|…|\bto\b|\band\b|\bor\b|\bnor\b|\beven\b|\bperhaps\b|\bmaybe\b|"
                        r"\bpossibly\b|\bprobably\b|\bup\s+to\b|\babout\b|\baround\b))+\s*$", re.I)
_CITE = re.compile(r"(?:\b(?:refs?|references?|eqs?|equations?|figs?|figures?|tables?|sec|sections?|chapters?|appendix|"
                   r"theorems?|lemmas?|pp?|pages?|vol|volume|arxiv)\.?|\bno\.)\s*[:(\[~]?\s*$", re.I)
_MORE = re.compile(r"\b(?:(?:more|greater|larger|higher)\s+than|over|above|exceeding|at\s+least|beyond)\s*$", re.I)
_LESS = re.compile(r"\b(?:(?:less|fewer|lower|smaller)\s+than|below|under)\s*$", re.I)
_BOUNDARY = re.compile(r"[.;:!?](?=\s|$)|\b(?:but|however|whereas|although|though|instead)\b"
                       r"|^\s*(?:no|yes)\b\s*[,.!]", re.I)
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|none|cannot|unlike|rather\s+than|instead\s+of|other\s+than|"
                       r"fail(?:s|ed)?\s+to)\b|n't\b", re.I)
_SEP = (r"(?:\s*(?:,|/|\bor\b|\band\b|\bnor\b|\bvs\.?|\bversus\b|\beither\b|\bplus\b))+\s*"
        r"(?:(?:possibly|perhaps|maybe|probably|likely|even|also|the|a|an)\s+)*")
_OR = re.compile(r"^\s*,?\s*(?:\bor\b|/|\bvs\.?|\bversus\b)|(?:\bor\b|\beither\b|/|\bvs\.?|\bversus\b)\s*,?\s*$", re.I)
_FORMULA = re.compile(r"[/^∝=<>√]|\b(?:log|ln|exp|sqrt|poly)\b|(?<![\w.])[b-zA-HJ-Z](?![\w.'])")
_GUESS = re.compile(r"\b(?:maybe|perhaps|possibly|probably|likely|i\s+(?:think|guess|believe)|(?:might|may)\s+be)\b", re.I)
_ABSTAIN = re.compile(r"""\b(?:
    i\s+(?:do\s+not|don't|did\s+not|didn't)\s+(?:know|recogni[sz]e|have\s+(?:any\s+)?(?:information|details|data|knowledge))
  | i\s*(?:am|'m)\s+(?:not\s+(?:sure|certain|aware|familiar)|unsure|uncertain|unaware|unable|afraid\s+i)
  | i\s+(?:cannot|can't|can\s+not|could\s+not|couldn't)\s+(?:answer|say|tell|determine|find|provide|recall|confirm|identify)
  | i\s+(?:have\s+not|haven't|have\s+never|never)\s+(?:read|seen|heard|come\s+across)
  | i\s+have\s+no\s+(?:information|idea|knowledge|record|details|data) | no\s+idea | unknown\s+to\s+me
  | (?:beyond|outside)\s+my\s+knowledge | not\s+(?:enough|sufficient)\s+information
  | (?:does|do|did)\s*(?:\s+not|n't)\s+(?:specify|say|mention|report|state)
  | (?:is|are|was|were)\s+not\s+(?:specified|mentioned|reported|stated)
  )\b|^\W*(?:not\s+sure|unsure|unknown|n/?a)\W*$""", re.X | re.I)


@dataclass(frozen=True)
class Num:  # tol: how far another value may be and still be this one; unit: words.unit_key ("%" or a stem)
    value: float
    tol: float
    unit: str | None
    cmp: str              # "" | ">" ("more than 56") | "<"
    start: int
    end: int
    cite: bool = False    # "Ref. [56]", "Eq. (3)": a pointer, not a value


def plain(text: str) -> str:
    """The text as grading reads it: NFKC, superscripts as ^n, typographic dashes, quotes and signs as ASCII."""
    text = re.sub(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+", lambda m: "^" + m.group().translate(_SUPERSCRIPT), text or "")
    return unicodedata.normalize("NFKC", text).translate(_PLAIN)


def is_abstention(answer: str) -> bool:
    """Does the answer decline ("I don't know that paper", "I'm not sure", "the paper does not say")?"""
    return bool(_ABSTAIN.search(plain(answer)))


def _unit(text: str, end: int) -> tuple[str | None, int]:
    """The unit after a number (up to two adjectives between: "127 superconducting qubits"), and where it ends."""
    pos = end
    for _ in range(3):
        if not (m := re.match(r"\s*-?\s*([^\W\d_]+)", text[pos:])):
            break
        pos += m.end()
        if m.group(1).lower() in UNITS:
            return unit_key(m.group(1)), pos
        if m.group(1).lower() in STOPWORDS or not m.group(1).islower():
            break
    return None, end


def _word_numbers(text: str) -> list[tuple[float, int, int]]:
    """Numbers written in words: "twenty-one", "one hundred and five", "two thirds", "a half", "three million"."""
    toks = [(m.group().lower(), m.start(), m.end()) for m in re.finditer(r"[^\W\d_]+", text)]
    out, i = [], 0
    while i < len(toks):
        total, cur, j, seen = 0.0, 0.0, i, False
        while j < len(toks) and (j == i or re.fullmatch(r"[\s-]+", text[toks[j - 1][2]:toks[j][1]])):
            w = toks[j][0]
            if w in _SMALL and (cur % 100 == 0 or cur % 100 >= 20 and cur % 10 == 0 and _SMALL[w] < 10):
                cur, seen = cur + _SMALL[w], True
            elif w in ("a", "an") and j == i:
                cur = 1.0
            elif w == "hundred" and (seen or cur == 1):
                cur, seen = max(cur, 1) * 100, True
            elif w in _SCALES and (seen or cur == 1):
                total, cur, seen = total + max(cur, 1) * _SCALES[w], 0.0, True
            elif w == "and" and seen and j + 1 < len(toks) and toks[j + 1][0] in _SMALL:
                pass
            elif w in _FRACTIONS and 1 <= total + cur <= 10 and j > i:
                out.append(((total + cur) / _FRACTIONS[w], toks[i][1], toks[j][2]))
                seen, j = False, j + 1
                break
            else:
                break
            j += 1
        if seen and not (toks[i][0] == "one" and j == i + 1 and _unit(text, toks[i][2])[0] is None):
            out.append((total + cur, toks[i][1], toks[j - 1][2]))  # "one" alone is a pronoun unless a unit follows
        i = max(j, i + 1)
    return out


def numbers(text: str) -> list[Num]:
    """Every number in `text` with its unit, comparator and whether it is a citation; the numbers of a list or range
    without their own unit take the unit written after the last of them ("5, 10 and 56 qubits")."""
    raw: list[tuple[float, float, int, int, bool]] = []  # value, tol, start, end, percent
    for m in _NUM.finditer(text):
        s = m.start()
        if s >= 2 and text[s - 1] == "-" and text[s - 2].isalpha():  # ML-DSA-65: part of a name
            continue
        g = m.groupdict()
        if g["m"] or g["pe"] or g["em"]:  # a mantissa's digits set the precision; 10^-3 alone is exact
            mant, e = (g["m"], g["e"]) if g["m"] else ("1", g["pe"]) if g["pe"] else (g["em"], g["ee"])
            v = float(mant) * 10.0 ** int(e)
            tol = None if g["pe"] else 0.5 * 10.0 ** (int(e) - len(mant.partition(".")[2]))
        elif g["fn"]:
            v, tol = int(g["fn"]) / max(int(g["fd"]), 1), None
        else:
            v, tol = float(g["d"].replace(",", "")), 0.5 * 10 ** -len(g["d"].partition(".")[2])
            letters = re.match(r"[^\W\d_]+", text[m.end():])
            if not m.group("pct") and letters and letters.group().lower() not in UNITS:  # 2D, 3rd: no quantity
                continue
            if (scale := re.match(r"\s+(thousand|million|billion)\b", text[m.end():], re.I)) and not m.group("pct"):
                v, tol = v * _SCALES[scale.group(1).lower()], tol * _SCALES[scale.group(1).lower()]
        raw.append((v, 0.01 * v if tol is None else tol, s, m.end(), bool(m.group("pct"))))
    raw += [(v, 0.01 * v, s, e, False) for v, s, e in _word_numbers(text)]
    raw.sort(key=lambda r: r[2])
    out: list[Num] = []
    for v, tol, s, e, pct in raw:
        unit, e2 = ("%", e) if pct else _unit(text, e)
        b = text[max(0, s - 24):s]
        cite = bool(_CITE.search(b) or (re.search(r"\[[\d,\s-]*$", text[:s]) and re.match(r"[\d,\s-]*\]", text[e:])))
        out.append(Num(v, tol, unit, ">" if _MORE.search(b) else "<" if _LESS.search(b) else "", s, e2, cite))
    for i in range(len(out) - 2, -1, -1):  # a list or range shares the unit written after its last number
        if out[i].unit is None and out[i + 1].unit and _GROUP_GAP.match(text[out[i].end:out[i + 1].start]):
            out[i] = dataclasses.replace(out[i], unit=out[i + 1].unit)
    return out


def _same(a: Num, g: Num) -> bool:
    """Does answer number `a` state gold number `g` (same value within g's precision, units that agree)?"""
    if a.cmp != g.cmp or (a.unit and g.unit and a.unit != g.unit):
        return False
    pairs = [(a.value, g.value)]
    if g.unit == "%" and a.unit is None and 0 < a.value <= 1:
        pairs.append((a.value * 100, g.value))
    if a.unit == "%" and g.unit is None and 0 < g.value <= 1:
        pairs.append((a.value / 100, g.value))
    return any(abs(x - y) <= g.tol + 1e-12 * max(1.0, abs(y)) for x, y in pairs)


def _plain(text: str, start: int) -> bool:
    """Is the mention at `start` stated plainly: no negation before it in its clause, not inside a question?"""
    bounds = [m.end() for m in _BOUNDARY.finditer(text, 0, start)]
    if _NEGATION.search(text, bounds[-1] if bounds else 0, start):
        return False
    end = re.search(r"[.!?](?=\s|$)", text[start:])
    return not (end and end.group() == "?")


def _name_like(word: str, initial: bool = False) -> bool:
    letters = [c for c in word if c.isalpha()]
    return len(word) > 1 and (len(letters) >= 2 and all(c.isupper() for c in letters) or any(c.isupper() for c in word[1:])
                              or (any(c.isdigit() for c in word) and bool(letters)) or (word[0].isupper() and not initial))


def _key(word: str) -> str:
    return re.sub(r"[-']", "", word.lower())


def _mentions(word: str, text: str) -> list[tuple[int, int]]:
    if _name_like(word):  # SLH-DSA = SLH DSA = slh-dsa, plurals aside; not ML-DSA
        pat = r"(?<![\w-])" + r"[-\s]?".join(re.escape(p) for p in re.split(r"[-']", word)) + r"(?:e?s)?(?!\w)"
        return [m.span() for m in re.finditer(pat, text, re.I)]
    return [m.span() for m in _WORD_RE.finditer(text) if stem(m.group()) == stem(word)]


@dataclass(frozen=True)
class Gold:
    nums: tuple[Num, ...]
    words: tuple[str, ...]       # the distinctive words an answer must state
    formula: str | None          # a regex for a formula gold
    keys: frozenset[str]         # every word of the gold (a list item that is one of them is no rival)

    @classmethod
    def parse(cls, gold: str, qstems: set[str]) -> Gold:
        text = plain(gold).strip()
        nums = tuple(n for n in numbers(text) if not n.cite)
        rest = text
        for n in reversed(nums):
            rest = rest[:n.start] + " " + rest[n.end:]
        formula = None
        if _FORMULA.search(rest):
            toks = re.findall(r"\d+(?:\.\d+)?|[^\W\d_]+|[^\s\w()\[\]{}$\\]", text.lower())
            while toks and toks[0] in ("∝", "~", "≈", "=", "o", "θ"):
                toks.pop(0)
            formula = (r"(?<![\w.])" + r"[\s()\[\]{}$\\x*]*".join(re.escape(t) for t in toks) + r"(?!\w)") if toks else None
        every = [w for w in _WORD_RE.findall(rest) if len(w) > 1 and w.lower() not in STOPWORDS | CONNECTORS | UNITS]
        words = [w for w in every if stem(w) not in qstems] or every  # a gold the question quotes is still the gold
        pick = [w for w in words if _name_like(w)] if nums else words  # "127 superconducting qubits": the number
        words = [w for w in pick if w.lower() not in GENERIC] or pick
        return cls(() if formula else nums, () if formula else tuple(words), formula,
                   frozenset(_key(w) for w in _WORD_RE.findall(text)))


def _rival_beside(text: str, start: int, end: int, golds: Sequence[Gold], qstems: set[str]) -> bool:
    """Is another name listed with this mention ("SLH-DSA or ML-DSA", "PyTorch, TensorFlow and JAX")?"""
    right = re.match(_SEP + f"({_WORD})", text[end:], re.I)
    left = re.search(f"({_WORD})[)\\]]?" + _SEP + "$", text[:start], re.I)
    return any(_name_like(w) and w.lower() not in STOPWORDS and not any(_key(w) in g.keys for g in golds)
               and stem(w) not in qstems for w in (m.group(1) if m else "" for m in (right, left)))


def grade(answer: str, short_answer: str, aliases: Sequence[str] = (), question: str = "") -> str:
    """correct / incorrect / not_attempted of `answer` against the gold `short_answer` (or any of its `aliases`)."""
    text, q = plain(answer), plain(question)
    if not text.strip():
        return NOT_ATTEMPTED
    targets = [t for t in (short_answer, *aliases) if t and t.strip()]
    for t in list(targets):  # "stateless hash-based signature algorithm (SLH-DSA)": either part states it
        if m := re.fullmatch(r"(.+?)\s+\(([^()\d]+)\)\s*", t.strip()):
            targets += [m.group(1), m.group(2)]
    abstains = is_abstention(text)
    if not targets:
        return NOT_ATTEMPTED if abstains else INCORRECT
    qstems = {stem(w) for w in _WORD_RE.findall(q)}
    golds = [Gold.parse(t, qstems) for t in targets]
    qvals = numbers(q)
    found = [n for n in numbers(text) if not n.cite and _plain(text, n.start)]
    gold_nums = [g for gold in golds for g in gold.nums]
    rivals = []
    if gold_nums:
        units = {g.unit for g in gold_nums} - {None} or {unit_key(w) for w in _WORD_RE.findall(q) if w.lower() in UNITS}
        year = any(1900 <= g.value < 2100 and g.value.is_integer() for g in gold_nums)
        rivals = [n for n in found if not any(_same(n, g) for g in gold_nums) and not any(_same(n, v) for v in qvals)
                  and (n.unit in units or (n.unit is None and (year or not (1900 <= n.value < 2100))))]

    def states(gold: Gold) -> bool:
        if not all(any(_same(n, g) for n in found) for g in gold.nums):
            return False
        if gold.formula:
            plain = [m.span() for m in re.finditer(gold.formula, text.lower()) if _plain(text, m.start())]
            return bool(plain) and not any(_OR.search(text[s[1]:s[1] + 6]) or _OR.search(text[max(0, s[0] - 8):s[0]])
                                           for s in plain)
        for w in gold.words:
            plain = [s for s in _mentions(w, text) if _plain(text, s[0])]
            if not plain or any(_rival_beside(text, s, e, golds, qstems) for s, e in plain):
                return False
        return bool(gold.nums or gold.words)

    if any(states(g) for g in golds) and not rivals:
        return CORRECT
    if abstains and not rivals:
        guessed = _GUESS.search(text) and any(
            _name_like(m.group(), bool(re.search(r"(?:^|[.!?:]\s+)$", text[:m.start()]))) and m.group().split("'")[0] != "I"
            and stem(m.group()) not in qstems for m in _WORD_RE.finditer(text))
        return INCORRECT if guessed else NOT_ATTEMPTED
    return INCORRECT
