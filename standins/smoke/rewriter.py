"""Deterministic rewordings and verdicts for the smoke endpoint (pure; NOT a language model).

- `augment_variants` (`Task: augment`): K-1 rewordings of a pair, each naming the title and the answer's key phrase in
  a wording that no QA stem and no other variant uses; 2 of every 5 get a reworded answer ("The paper reports that
  ...") that keeps every number, name and term of the sentence.
- `paraphrase_question` (`Task: paraphrase`): one new question, in a wording that shares (almost) no word with the QA
  or augment stems, so a word-set Jaccard check against the training questions passes for typical titles.
- `judge_verdict` (`Task: judge`, prompts/judge.txt): a verdict on one pair from the paper text the prompt carries.
"""

from __future__ import annotations

import hashlib
import re

from .writer import _STEMS, _STOP, _key_phrase, _short_title, last_block, split_sentences

AUGMENT_STEMS = (
    "What do we learn about {k} from \"{t}\"?",
    "Which claim about {k} appears in \"{t}\"?",
    "Can you summarise the statement on {k} made in \"{t}\"?",
    "Considering \"{t}\", what holds for {k}?",
    "What information does \"{t}\" give on {k}?",
    "What is the key point about {k} in \"{t}\"?",
    "From \"{t}\", what should one know about {k}?",
    "What does \"{t}\" tell us concerning {k}?",
    "Which statement does \"{t}\" make on {k}?",
    "What is written about {k} in the article \"{t}\"?",
    "Regarding \"{t}\", what is established for {k}?",
    "Could you state what \"{t}\" concludes on {k}?",
    "What is the takeaway on {k} in \"{t}\"?",
    "Per \"{t}\", what is true of {k}?",
    "What does the work \"{t}\" put forward on {k}?",
    "In \"{t}\", how is {k} summed up?",
    "What conclusion on {k} is drawn in \"{t}\"?",
    "What do the results of \"{t}\" indicate on {k}?",
    "Which point does \"{t}\" raise on {k}?",
    "What should a reader of \"{t}\" remember on {k}?",
)
# words that no QA stem and no augment stem uses (checked by the tests), so a seen question differs in its wording
PARAPHRASE_STEMS = (
    "Briefly, where do the findings of \"{t}\" stand with respect to {k}?",
    "Explain {k}, as covered by \"{t}\"?",
    "Any insight into {k} offered by \"{t}\"?",
    "Give me the gist of {k}, going by \"{t}\"?",
)
# the aspect a QA question of each focus asks about, kept in its rewordings: facts of one paper that share an answer
# sentence (asked by different QA prompts) then get different rewordings, as a language model's would be
_ASPECTS = {"factual": "{k}", "results": "the result on {k}", "methods": "the method for {k}",
            "novelty": "the advance on {k}", "definitions": "the notion of {k}"}
_FOCUS_OF = [(focus, re.compile(re.escape(stem).replace(re.escape("{t}"), ".+").replace(re.escape("{k}"), ".+")))
             for focus, stems in _STEMS.items() for stem in stems]
_LEADS = ("The paper reports that {s}", "In \"{t}\", {s}")
_PRONOUNS = ((r"\bWe\b", "the authors"), (r"\bwe\b", "the authors"), (r"\bOur\b", "their"), (r"\bour\b", "their"),
             (r"\bus\b", "them"), (r"\bourselves\b", "themselves"))
_SOFT_FIRST = {"the", "a", "an", "this", "these", "those", "here", "in", "for", "using", "we", "our", "it", "its",
               "there", "such", "both", "each", "to", "by", "with", "as", "on", "at", "from", "when", "while"}


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


_OPENER = re.compile(r"^(?:in this (?:work|paper|article|letter)|here|in this manuscript)\s*,?\s+", re.I)


def reword_answer(answer: str, title: str, which: int) -> str:
    """The answer with a lead-in and in the third person; its numbers, names and terms are kept as written."""
    s = _OPENER.sub("", answer.strip())
    for pattern, repl in _PRONOUNS:  # third person
        s = re.sub(pattern, repl, s)
    first = s.split(" ", 1)[0]
    if first.lower() in _SOFT_FIRST:  # lower-case a common first word only: names and acronyms stay as they are
        s = s[0].lower() + s[1:]
    return _LEADS[which % len(_LEADS)].format(s=s, t=_short_title(title))


def augment_variants(title: str, question: str, answer: str, n: int) -> list[dict[str, str]]:
    """`n` rewordings (variants 1..n) of a pair; answers of variants 2 and 4 of every 5 are reworded."""
    t = _short_title(title or "the untitled paper")
    focus = next((f for f, pattern in _FOCUS_OF if pattern.fullmatch(question)), "factual")  # whose stem worded it
    k = _ASPECTS[focus].format(k=_key_phrase(answer) or _key_phrase(question) or "its main claim")
    # facts of one paper start at different stems; those sharing an answer (one per focus) at disjoint runs of n
    start = (_digest(t, answer) + list(_ASPECTS).index(focus) * n) % len(AUGMENT_STEMS)
    out: list[dict[str, str]] = []
    seen = {question.lower()}
    for j in range(len(AUGMENT_STEMS)):
        if len(out) >= n:
            break
        q = AUGMENT_STEMS[(start + j) % len(AUGMENT_STEMS)].format(t=t, k=k)
        if q.lower() in seen:
            continue
        seen.add(q.lower())
        variant = len(out) + 1
        a = reword_answer(answer, title, variant % 5 // 4) if variant % 5 in (2, 4) else answer
        out.append({"question": q, "answer": a})
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[^\W_]+", text.lower()))


def paraphrase_question(title: str, answer: str, asked: list[str]) -> str:
    """A new question for `answer`, worded unlike the questions already `asked` of it."""
    t = _short_title(title or "the untitled paper")
    asked_words = set().union(*(_words(q) for q in asked)) if asked else set()
    k = _key_phrase(answer) or "its main claim"
    # prefer a key phrase of a clause of the answer that the asked questions do not name (a real paraphrase names
    # the fact anew)
    clauses = [c for c in re.split(r"[,;:]| and | which | that | by | with | for ", answer) if len(c.split()) >= 2]
    k = next((c for c in map(_key_phrase, clauses)
              if c and len(_words(c) - asked_words) >= 2 and c.lower() != k.lower()), k)
    return PARAPHRASE_STEMS[_digest(t, answer) % len(PARAPHRASE_STEMS)].format(t=t, k=k)


_LINE = re.compile(r"^(Title|Question|Answer|Asked|Short answer|Alias|Evidence):[ \t]*(.*)$", re.M)


def parse_fact_block(text: str) -> dict[str, object]:
    """The pair an augment or paraphrase prompt carries (its last `<paper>` block): title, question, answer, and
    the questions already asked of it (`Asked:` lines)."""
    block = last_block(text, "paper", default=text)
    out: dict[str, object] = {"title": "", "question": "", "answer": "", "asked": [], "aliases": []}
    for key, value in _LINE.findall(block):
        if key in ("Asked", "Alias"):
            out["asked" if key == "Asked" else "aliases"].append(value.strip())  # type: ignore[union-attr]
        else:
            out[key.lower().replace(" ", "_")] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# `Task: judge` (prompts/judge.txt): a verdict on one pair against the paper text the prompt carries

_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
# the words the question stems and the answer lead-ins bring, which name no subject of the paper
_FRAME = _words(" ".join([*(s for stems in _STEMS.values() for s in stems), *AUGMENT_STEMS, *PARAPHRASE_STEMS,
                          *_ASPECTS.values(), *_LEADS, "the authors their them paper reports"]))


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"[^\W_]+", text.lower())
            if (len(w) >= 3 or w.isdigit()) and w not in _STOP and w not in _FRAME]


def _scale(share: float) -> int:
    return 5 if share >= 0.9 else 4 if share >= 0.75 else 3 if share >= 0.5 else 2 if share >= 0.25 else 1


def judge_verdict(text: str) -> dict[str, object]:
    """{"reason", "answerable", "correct"} for the pair of a judge prompt, from its paper text alone: the answer is
    correct as far as each of its sentences has its content words in one sentence of the paper; the question is
    answerable as far as the subject it names (its content words beyond the stem's and a quoted title) occurs in the
    paper, and not when it quotes another paper's title."""
    paper = last_block(text, "paper")
    pair = parse_fact_block(last_block(text, "pair"))
    title = str(parse_fact_block(paper)["title"])
    question, answer = str(pair["question"]), str(pair["answer"])
    body = re.split(r"^Abstract:[ \t]*$", paper, maxsplit=1, flags=re.M)[-1]
    sentences = [set(_content(s)) for s in split_sentences(body.replace("Excerpt of the full text:", " "))]
    sentences.append(set(_content(title)))
    paper_words = set().union(*sentences)

    worst, worst_share = "", 1.0
    for s in split_sentences(_QUOTED.sub(" ", answer)) or [answer]:
        words = _content(s)
        if not words:
            continue
        share = max(sum(w in ps for w in words) / len(words) for ps in sentences)
        if share < worst_share:
            worst, worst_share = s, share
    correct = _scale(worst_share) if answer else 1

    quoted = [q.strip("\"“”") for q in _QUOTED.findall(question)]
    other_title = next((q for q in quoted if len(q.split()) >= 3 and _words(q) != _words(_short_title(title))), "")
    subject = _content(_QUOTED.sub(" ", question))
    missing = [w for w in subject if w not in paper_words]
    answerable = 1 if other_title else _scale(1 - len(missing) / len(subject)) if subject else 3

    if other_title:
        why_q = f"the question asks about \"{other_title[:80]}\", not this paper"
    elif missing and answerable < 5:
        why_q = "the question's subject is not in the text (" + ", ".join(missing[:5]) + ")"
    else:
        why_q = "the text addresses the question's subject"
    if correct >= 5:
        why_a = "every sentence of the answer is stated in the text"
    else:
        why_a = (f"only {worst_share:.0%} of the content words of the answer's sentence \"{worst[:80]}\" occur in "
                 "any one sentence of the text")
    return {"reason": f"{why_q}; {why_a}.", "answerable": answerable, "correct": correct}
