"""Words: the project's one text normaliser (`norm_words`: what questions, titles and near-duplicates are compared
by, in generate and validate), and the tables short-answer grading (`qrb.grade`) reads: number words ("two" = 2),
units a number carries ("56 qubits", "67%": one key per unit, "%" for every way of writing percent), words that say
nothing of a subject, Porter stems (what rouge-score stems with). Pure: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


def norm_words(text: str) -> list[str]:
    """Casefolded words (NFKC), punctuation, spacing and LaTeX markers dropped."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).casefold())


def word_set(text: str) -> frozenset[str]:
    return frozenset(norm_words(text)) or frozenset([text.strip().lower()])


def near_any(words: frozenset[str], sets: list[frozenset[str]], t: float) -> bool:
    """Is some set's word-set Jaccard with `words` at least `t`?"""
    lo, hi = t * len(words), len(words) / t  # |A & B| / |A | B| >= t needs t|A| <= |B| <= |A|/t
    return any(lo <= len(s) <= hi and len(words & s) / len(words | s) >= t for s in sets)


QUOTED = re.compile(r'["\u201c]([^"\u201d]+)["\u201d]')
# what comes before a quoted title ("in the study "...""), not before a quoted term ("what is "..."?")
TITLE_CUE = re.compile(r"\b(?:paper|study|work|article|preprint|titled|called|named|according to|authors of|in|from)"
                       r"\s*$", re.IGNORECASE)
TITLE_JACCARD = 0.7  # a quoted title this near a known one is that paper (a word dropped or changed in the asking)


def names_unknown_paper(question: str, titles: list[frozenset[str]]) -> bool:
    """Does the question quote a title (4+ words in quotes after a word that names a paper, not a fill-in-the-blank)
    near none of `titles` (word sets)? Never when `titles` is empty: then nothing is known to compare with."""
    quoted = [word_set(m[1]) for m in QUOTED.finditer(question)
              if "___" not in m[1] and len(m[1].split()) >= 4 and TITLE_CUE.search(question, 0, m.start())]
    return bool(titles) and any(not near_any(q, titles, TITLE_JACCARD) for q in quoted)


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

# not validate's stop words (stages/validate/features.py), on purpose: each list is tuned to what it measures
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


def unit_key(token: str) -> str | None:
    low = token.lower()
    if low not in UNITS:
        return None
    return "%" if low in PERCENT else stem(low)
