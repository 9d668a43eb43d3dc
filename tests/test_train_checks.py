"""Train on the tiny Llama: an empty eval split reports no eval CE (never 0), and DoRA is not LoRA."""

from __future__ import annotations

from helpers import qa_rows, split_rows, train_adapter


def test_an_empty_eval_split_reports_no_eval_ce(tiny_model_dir, corpus_dir, tmp_path):
    train_rows, _ = split_rows(qa_rows(corpus_dir), 8, 0)
    _, _, metrics = train_adapter(tiny_model_dir, train_rows, [], tmp_path / "a", epochs=1.0)
    assert metrics["eval_ce"] is None and metrics["eval_tokens"] == 0
