"""Pure text checks for the validate stage (no I/O, no models): the pattern lists GX matches on
"question <newline> answer", normalisation and stems, the English and is-a-question heuristics, whether a question
names its paper, and the text of a paper an answer may draw on."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Pattern lists (checked with GX's regex-list expectations on "question <newline> answer")

REFUSAL_PATTERNS = [
    r"(?i)\bas an? (?:ai|artificial intelligence|language model|large language model)\b",
    r"(?i)\bI (?:cannot|can't|can not|am unable to|am not able to|do not have access|don't have access)\b",
    r"(?i)\bI'm (?:sorry|unable|not able)\b",
    r"(?i)\bI apologi[sz]e\b",
    r"(?i)\bsorry,? (?:but )?I\b",
    r"(?i)\b(?:the|this) (?:provided |given |above )?(?:text|abstract|passage|paper|article|document|context|excerpt)"
    r" (?:does not|doesn't|did not|do not) (?:mention|say|specify|provide|state|discuss|contain|include|give|address)",
    r"(?i)\b(?:is|are) not (?:explicitly )?(?:mentioned|specified|provided|stated|discussed|given|addressed) in the "
    r"(?:provided |given |above )?(?:text|abstract|passage|paper|article|context|excerpt)\b",
    r"(?i)\b(?:not enough|insufficient|no) information (?:is )?(?:provided |given |available )?(?:in|from) the "
    r"(?:provided |given )?(?:text|abstract|passage|paper|article|context)\b",
    r"(?i)\bmy (?:knowledge|training) (?:cutoff|cut-off|data)\b",
    r"(?im)^\s*(?:n/?a|none|unknown|no answer|not applicable|tbd|todo|lorem ipsum[^\n]*)\s*[.!]?\s*$",
]
PROMPT_LEAK_PATTERNS = [
    r"(?i)\b(?:here (?:is|are)|below (?:is|are)) (?:the |some |your )?(?:\d+ |three |five |a few )?"
    r"(?:question|answer|qa|q&a)(?:[- ]answer)?(?: pair)?s?\b",
    r"(?i)\bgenerate (?:\d+ |three |five |some )?(?:question|qa|q&a)(?:[- ]answer)?(?: pair)?s?\b",
    r"(?i)\b(?:based on|according to|from) the (?:provided|given|above|following|supplied) "
    r"(?:text|abstract|passage|context|paper|document|excerpt|information)\b",
    r"(?i)\byou are (?:a|an) (?:helpful|expert|ai|research)\b",
    r"(?i)\bquestion focus\s*:",
    r"(?i)\buntrusted (?:data|text|content)\b",
    r"(?i)</?(?:paper|abstract|document|context|text)>",
    r"(?i)\b(?:BEGIN|END)[ _](?:PAPER|ABSTRACT|TEXT|DOCUMENT|UNTRUSTED)\b",
    r"\{\{\s*(?:n|paper|title|abstract|text|question|answer|context|focus|doi)\s*\}\}",
    r"(?i)\{(?:paper|title|abstract|paper_text|question|answer|context|doi)\}",
    r"<\|[A-Za-z_]+\|>",
    r"\[/?INST\]|<</?SYS>>",
    r"(?im)^\s*(?:system|user|assistant)\s*:",
    r"(?im)^\s*(?:question|answer|q|a)\s*\d*\s*[:：]",
]
MARKUP_PATTERNS = [
    r"(?i)\"\s*(?:question|answer|pairs|doi|prompt_id|response_id)\"\s*:",   # a JSON key
    r"(?m)^\s*[\[{]\s*[\"{\[]",                                              # a line opening JSON
    r"\}\s*,\s*\{\s*\"",                                                     # JSON objects in a row
    r"```",                                                                  # a Markdown code fence
    r"(?i)</(?:p|div|span|b|i|em|strong|a|ul|ol|li|h[1-6]|table|tr|td|th|html|body|head|script|style|sup|sub|"
    r"code|pre)>",                                                          # a closing HTML tag
    r"(?i)<(?:p|div|span|br|b|i|em|strong|a|ul|ol|li|h[1-6]|table|tr|td|th|html|body|head|script|style|sup|sub|"
    r"code|pre|img|hr)(?:\s+[a-z-]+=\"[^\"]*\")*\s*/?>",                   # an HTML tag (never a maths `x<a`)
    r"(?m)^\s{0,3}#{1,6}\s",                                                 # a Markdown heading
    r"\*\*[^*\n]+\*\*",                                                      # Markdown bold
    r"(?m)^\s*(?:[-*•]|\d+[.)])\s+\S",                                       # a list item
    r"\[[^\]\n]+\]\((?:https?://|www\.)",                                    # a Markdown link
    r"&(?:amp|lt|gt|quot|apos|nbsp|#\d+|#x[0-9a-fA-F]+);",                   # an HTML entity
    r"\\n(?![A-Za-z])|\\t(?![A-Za-z])",                                      # an escaped newline/tab
]

# ---------------------------------------------------------------------------------------------------------------
# Text helpers (pure)

_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either else few for from further had has have having he her here
hers him his how i if in into is it its itself just less may me might more most much must my no nor not of off on once
only or other our ours out over own per same she should so some such than that the their theirs them then there these
they this those through thus to too under until up upon us very via was we were what when where whether which while
who whom whose why will with within without would yet you your yours paper papers article work study studies authors
author abstract text show shows shown present presents presented propose proposes proposed introduce introduces
introduced demonstrate demonstrates demonstrated result results find finds found new approach using use used
""".split())
_EN_FUNCTION = frozenset("""
the a an of and to in is are was were be been being for on with by from at as that this these those which who whom
whose what when where why how it its their they we our not or but than then there here can could will would should may
might must has have had do does did into onto about over under between through during such each both either neither
also only very more most less so if whether while because same other another any all some no nor
""".split())
_FOREIGN_FUNCTION = frozenset("""
der das und ist nicht ein eine einer einen mit für von zu dem den des wir werden wird auf sich im auch welche welcher
welches wie wird sind oder aber bei durch nach über unter wurde können kann diese dieser dieses
le la les est et une du dans pour qui sur avec sont nous cette ces pas par quelle quel quels quelles comment leur
sont être où
el los las es una por con para su sus al como qué cuál cuáles está son este esta estos entre sobre también
il della delle degli gli sono nel nella che è questo questa quale
os da do das dos em não um uma com pelo pela são qual quais como
""".split())
_GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "ϵ": "epsilon", "ζ": "zeta",
          "η": "eta", "θ": "theta", "κ": "kappa", "λ": "lambda", "μ": "mu", "ν": "nu", "ξ": "xi", "π": "pi",
          "ρ": "rho", "σ": "sigma", "τ": "tau", "φ": "phi", "ϕ": "phi", "χ": "chi", "ψ": "psi", "ω": "omega",
          "Γ": "gamma", "Δ": "delta", "Θ": "theta", "Λ": "lambda", "Ξ": "xi", "Π": "pi", "Σ": "sigma", "Φ": "phi",
          "Ψ": "psi", "Ω": "omega"}
_WORD = re.compile(r"[^\W_]+")
_MATH = re.compile(r"\$[^$]*\$")
_SUFFIXES = ("ations", "ation", "ings", "ing", "edly", "ed", "ies", "es", "s", "ly")


def normalize_text(text: str) -> str:
    """Casefolded words only (LaTeX markers, punctuation and spacing dropped): the key for near-duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD.findall(text.replace("\\", " ")))


def _stem(word: str) -> str:
    for suf in _SUFFIXES:
        if len(word) > len(suf) + 3 and word.endswith(suf):
            word = word[: -len(suf)] + ("y" if suf == "ies" else "")
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def content_tokens(text: str) -> list[str]:
    """Stemmed content words (stopwords and single letters dropped; Greek letters spelled out like LaTeX)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(f" {_GREEK[c]} " if c in _GREEK else c for c in text).casefold()
    out = []
    for w in _WORD.findall(text.replace("\\", " ")):
        if w in _STOPWORDS or (len(w) == 1 and not w.isdigit()):
            continue
        out.append(_stem(w))
    return out


def overlap_score(answer: str, paper_tokens: set[str]) -> float:
    """Share of the answer's content words that occur in the paper's text (0 when it has none)."""
    toks = content_tokens(answer)
    if not toks:
        return 0.0
    return sum(t in paper_tokens for t in toks) / len(toks)


def is_english(text: str) -> bool:
    """Heuristic: not mostly non-Latin script, and English function words outnumber other languages' ones.

    Text with no evidence either way (a formula, a name, a number) counts as English."""
    plain = _MATH.sub(" ", text)
    letters = [c for c in plain if c.isalpha()]
    if letters:
        foreign_script = sum(1 for c in letters if ord(c) > 0x24F and not 0x370 <= ord(c) <= 0x3FF)
        if foreign_script / len(letters) > 0.3:
            return False
    words = _WORD.findall(plain.casefold())
    en = sum(w in _EN_FUNCTION for w in words)
    other = sum(w in _FOREIGN_FUNCTION for w in words)
    return not (other >= 2 and other > en)


def is_question(text: str) -> bool:
    """Ends with a question mark, has at least three words and asks one thing."""
    s = text.strip()
    return s.endswith("?") and len(s.split()) >= 3 and s.count("?") <= 2


_DEICTIC = re.compile(
    r"(?i)\b(?:(?:this|that|these|the\s+(?:above|given|provided|following|present|current|same|original))\s+"
    r"(?:paper|article|text|study|abstract|passage|work|document|excerpt|manuscript|publication|preprint|research|"
    r"letter|authors?|source|context)"
    r"|the\s+(?:paper|article|text|abstract|passage|document|excerpt|manuscript|publication|preprint|authors?|"
    r"researchers))\b")
_QUOTED = re.compile(r"[\"“”'‘’«»]([^\"“”«»]{15,})[\"“”'‘’«»]")


def names_its_paper(question: str, title: str | None, doi: str | None) -> bool:
    """Whether the question identifies the paper: its title (or most of it, or a quoted prefix) or its DOI."""
    if doi and doi.casefold() in question.casefold():
        return True
    if not title:
        return False
    nq, nt = normalize_text(question), normalize_text(title)
    if nt and nt in nq:
        return True
    for quoted in _QUOTED.findall(question):
        nqt = normalize_text(quoted)
        if len(nqt) >= 15 and nt.startswith(nqt):
            return True
    tt = set(content_tokens(title))
    return bool(tt) and len(tt & set(content_tokens(question))) / len(tt) >= 0.6


def leans_on_unnamed_source(question: str, title: str | None, doi: str | None) -> bool:
    return bool(_DEICTIC.search(question)) and not names_its_paper(question, title, doi)


def paper_text(paper: dict[str, Any]) -> str:
    """What an answer may draw on: title, abstract (full text when scraped) and the paper's bibliographic facts."""
    parts: list[str] = []
    for key in ("title", "abstract", "full_text", "published", "volume", "page", "arxiv", "citation", "doi", "journal"):
        v = paper.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            parts.append(str(v))
    for key in ("authors", "affiliations"):
        v = paper.get(key)
        if isinstance(v, list):
            parts.extend(str(x) for x in v if isinstance(x, str))
    return "\n".join(parts)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'$\\])")


def paper_sentences(paper: dict[str, Any]) -> list[str]:
    sents = [str(paper.get("title") or "")]
    for key in ("abstract", "full_text"):
        sents += _SENT_SPLIT.split(" ".join(str(paper.get(key) or "").split()))
    return [s for s in sents if s.strip()]

