"""The validate stage's expectations (row, judge, seen and dataset check lists, built from params) and `GxRunner`,
which runs each list as a great-expectations suite. GX is imported only when a runner is built."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from qrb.schema import PROVENANCE_FIELDS, REQUIRED_PAIR_FIELDS

from . import ValidateParams
from .features import MARKUP_PATTERNS, PROMPT_LEAK_PATTERNS, REFUSAL_PATTERNS

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
        _flag("missing_field", "has_required_fields", "every row has the fields " + ", ".join(REQUIRED_PAIR_FIELDS)),
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
        _flag("doi_format", "doi_ok", "the DOI looks like 10.NNNN/suffix (no DOI: an abstention row)"),
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
        _flag("raft_malformed", "raft_ok", "a RAFT row's question is the apps' RAG message and shows no held-out "
              "(eval) paper's excerpt"),
    ]
    return checks


def seen_checks() -> list[Check]:
    """The seen split's checks against the clean training rows (run after the row checks, on seen rows only)."""
    return [
        _flag("seen_fact_untrained", "fact_trained",
              "the seen question's fact (fact_id) has a clean training pair of the same paper"),
        _flag("seen_question_in_train", "question_unseen", "the seen question is no clean training question again "
              "(exactly or up to case, spacing, punctuation and LaTeX markers; any fact, any variant)"),
    ]


def judge_checks(p: ValidateParams) -> list[Check]:
    """The LLM judge's verdicts (rows that passed the row checks; scores are null where there is no verdict)."""
    t = p.judge.threshold
    return [
        _flag("judge_failed", "judge_ok", "the LLM judge gave a readable verdict"),
        Check("judge_unanswerable", f"[judge_unanswerable] the LLM judge rates the question answerable from its "
              f"paper at least {t} of 5", "ExpectColumnValuesToBeBetween",
              {"column": "judge_answerable", "min_value": t}),
        Check("judge_incorrect", f"[judge_incorrect] the LLM judge rates the answer correct by its paper at least "
              f"{t} of 5", "ExpectColumnValuesToBeBetween", {"column": "judge_correct", "min_value": t}),
    ]


def dataset_checks(p: ValidateParams) -> list[Check]:
    # Facts, not rows, where a fact's K variants would otherwise count K times (see features.dataset_columns)
    return [
        Check("max_fail_rate", f"[max_fail_rate] at most {p.max_fail_rate:.0%} of the train and eval rows fail a row "
              "check", "ExpectColumnMeanToBeBetween",
              {"column": "failed", "min_value": 0.0, "max_value": p.max_fail_rate}),
        Check("min_rows", f"[min_rows] at least {p.min_rows} clean train facts (a fact's variants count once)",
              "ExpectColumnSumToBeBetween", {"column": "clean_train", "min_value": p.min_rows}),
        Check("min_eval_rows", f"[min_eval_rows] at least {p.min_eval_rows} clean eval rows",
              "ExpectColumnSumToBeBetween", {"column": "clean_eval", "min_value": p.min_eval_rows}),
        Check("max_eval_fraction", f"[max_eval_fraction] eval holds at most {p.max_eval_fraction:.0%} of the clean "
              "facts", "ExpectColumnMeanToBeBetween",
              {"column": "eval_share", "min_value": 0.0, "max_value": p.max_eval_fraction}),
        Check("max_paper_share", f"[max_paper_share] no paper has more than {p.max_paper_share:.0%} of the clean "
              "train facts", "ExpectColumnMaxToBeBetween",
              {"column": "train_paper_share", "min_value": 0.0, "max_value": p.max_paper_share}),
        Check("split_disjoint", "[split_disjoint] no paper has clean rows in both train and eval",
              "ExpectColumnValuesToBeInSet", {"column": "paper_in_both_splits", "value_set": [False]}),
    ]


# ---------------------------------------------------------------------------------------------------------------
# great-expectations

SITE_NAME = "qrb_data_docs"
ROW_SUITE = "qa_pairs_rows"
SEEN_SUITE = "qa_pairs_seen"
JUDGE_SUITE = "qa_pairs_judge"
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
    """An ephemeral GX context with three pandas assets (rows, seen rows, dataset; a fourth, the judged rows, with
    the LLM judge), a suite, validation definition and checkpoint each."""

    def __init__(self, p: ValidateParams, docs_dir: Path | None) -> None:
        os.environ["GX_ANALYTICS_ENABLED"] = "False"
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

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
        self.checks = {ROW_SUITE: row_checks(p), SEEN_SUITE: seen_checks(), DATASET_SUITE: dataset_checks(p)}
        suites = [(ROW_SUITE, "pairs"), (SEEN_SUITE, "seen"), (DATASET_SUITE, "dataset")]
        if p.judge.endpoint is not None:
            self.checks[JUDGE_SUITE] = judge_checks(p)
            suites.insert(1, (JUDGE_SUITE, "judged"))
        for suite_name, asset_name in suites:
            batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
            index = ["row_id", "doi"] if suite_name == DATASET_SUITE else ["row_id"]  # what a failing row is named by
            suite = self.ctx.suites.add(gx.ExpectationSuite(name=suite_name))
            for c in self.checks[suite_name]:
                suite.add_expectation(getattr(gx.expectations, c.kind)(
                    **c.kwargs, description=c.description, meta={"reason": c.reason}))
            vd = self.ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite_name}_definition", data=batch, suite=suite))
            self.checkpoints[suite_name] = self.ctx.checkpoints.add(gx.Checkpoint(
                name=f"{suite_name}_checkpoint", validation_definitions=[vd], actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index,
                               "return_unexpected_index_query": False}))

    def run(self, suite_name: str, columns: dict[str, list[Any]]) -> list[CheckResult]:
        import pandas as pd
        from great_expectations.core.run_identifier import RunIdentifier

        df = pd.DataFrame(columns)
        res = self.checkpoints[suite_name].run(batch_parameters={"dataframe": df},
                                               run_id=RunIdentifier(run_name="validate"))
        (vr,) = res.run_results.values()
        checks = {c.reason: c for c in self.checks[suite_name]}
        by_reason = {}
        for r in vr.results:
            c = checks[r.expectation_config.meta["reason"]]
            exc = r.exception_info or {}
            if isinstance(exc, dict) and exc.get("raised_exception"):
                raise RuntimeError(f"validate: expectation `{c.reason}` raised: {exc.get('exception_message')}")
            result = r.result or {}
            unexpected = result.get("unexpected_index_list") or []
            by_reason[c.reason] = CheckResult(
                c.reason, c.description, bool(r.success), [str(u["row_id"]) for u in unexpected],
                _plain(result.get("observed_value")),
                {k: v for k, v in c.kwargs.items() if k in ("min_value", "max_value", "value_set")},
                [str(u["doi"]) for u in unexpected if "doi" in u])
        return [by_reason[reason] for reason in checks]  # in the suite's order
