"""The end of a run for a person: one screen (<= 40 lines, <= 100 columns) with the grades and their intervals, what
fine-tuning changed in one sentence, and one question answered side by side; numbers rounded."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flows import console

MODELS = ("base", "fine_tuned", "rag", "fine_tuned_rag", "rival_gpt-4o")
LONG_ANSWER = ("The paper discusses superconducting processors in general terms and reports that the authors "
               "characterise the device with randomized benchmarking, cross-entropy benchmarking and tomography "
               "of two-qubit gates across many calibration cycles over several weeks of operation in the lab.")


def grades(correct: float, incorrect: float, n: int, small: bool = False) -> dict:
    """A model's record as evaluate writes it: rates, intervals (or "n too small"), gains, the other metrics."""
    na = 1 - correct - incorrect
    ci = (lambda v: "n too small") if small else (lambda v: [max(0.0, v - 0.0912345), min(1.0, v + 0.1087654)])
    rec = {"n": n, "graded_n": n, "correct": correct, "incorrect": incorrect, "not_attempted": na,
           "hallucination_rate": incorrect / (correct + incorrect) if correct + incorrect else None,
           "cross_entropy": 3.786388315473284, "fact_recall": 0.2178391, "rougeL": 0.331234, "answer_words": 23.4567}
    for key in ("correct", "incorrect", "not_attempted", "cross_entropy"):
        rec[f"{key}_ci95"] = ci(rec[key])
    return rec


def write_workspace(ws: Path) -> None:
    report: dict = {}
    for s, n in (("golden", 5), ("seen", 26), ("eval", 40), ("invented", 12)):
        for sub in ("", "_after_cutoff", "_before_cutoff"):
            report[s + sub] = {m: grades(0.038461538 + 0.5 * (m == "fine_tuned"), 0.8 - 0.5 * (m == "fine_tuned"), n,
                                         small=n < 10) for m in MODELS}
        report[s]["fine_tuned"].update(correct_gain=0.5, correct_gain_ci95=[0.384615, 0.615384])
    (ws / "reports").mkdir(parents=True)
    (ws / "reports/evaluate.json").write_text(json.dumps(report))
    preds = []
    for i in range(3):
        q = f"How many qubits did the processor of the paper number {i} on random circuit sampling use in total?"
        for m in MODELS:
            right = m == "fine_tuned" and i == 2
            preds.append({"set": "seen", "model": m, "id": f"q{i}", "question": q, "short_answer": "56 qubits",
                          "reference": "It used 56 qubits.", "grade": "correct" if right else "incorrect",
                          "prediction": "The processor used 56 qubits." if right else LONG_ANSWER})
    (ws / "artifacts/evaluate").mkdir(parents=True)
    (ws / "artifacts/evaluate/predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))


def test_the_demo_ends_in_one_screen_with_grades_a_sentence_and_an_example(tmp_path, monkeypatch):
    from flows.demo import summary

    ws = tmp_path / "demo"
    write_workspace(ws)
    monkeypatch.chdir(tmp_path)
    stages = ["scrape", "index", "generate", "validate", "train", "evaluate", "model_card", "export"]
    run = {"workspace": str(ws), "profile": "smol", "wall_s": 407.31234,
           "stages": [{"stage": s, "wall_s": 12.3456, "ran": True} for s in stages]}
    screen = summary(run, Path("demo/logs/demo.log"))  # as `qrb demo` names it: relative to where it runs
    print(screen)  # shown with pytest -s
    lines = screen.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 100, (len(lines), max(map(len, lines)))
    assert not re.search(r"\d\.\d{4,}", screen)  # no 3.786388315473284
    assert "|" not in screen  # no markdown table: those stay in reports/
    # per set, each model's grades with intervals (none below the minimum n)
    [seen_base] = [line for line in lines if line.startswith("seen (n=26)")]
    assert seen_base.split()[2:] == ["base", "4%", "[0,", "15]", "80%", "[71,", "91]", "16%", "[7,", "27]"]
    assert any(line.split()[:4] == ["golden", "(n=5)", "base", "4%"] and "[" not in line for line in lines)
    assert "fine-tuned + RAG" in screen and "gpt-4o" not in screen and "(4 more rows)" in screen  # a rival's rows
    sentence = " ".join(screen.split("\n\n")[1].split())
    assert sentence.startswith("Fine-tuned is correct on 54% [45, 65] of seen questions vs base 4% [0, 15] "
                               "(paired gain +50 points [+38, +62]); it declines 16% [7, 27] of questions about "
                               "invented papers"), sentence
    # the example: the question fine-tuned got right and base did not, the answers side by side
    example = screen[screen.index("Example (seen"):].split("\n\n")[0]
    assert "number 2" in example and "one fine-tuned got right and base did not" in example
    answers = example.splitlines()[4:]  # below the question (2 lines), the gold answer and the column titles
    assert "The processor used 56 qubits." in answers[0] and answers[0].startswith("  The paper discusses")
    assert len(answers) == 2 and answers[-1].rstrip().endswith("…")  # a long answer is cut, not the screen


def test_a_report_without_grades_shows_dashes_and_no_sentence(tmp_path):
    ws = tmp_path / "ws"
    (ws / "reports").mkdir(parents=True)
    rec = {"n": 26, "fact_recall": 0.21, "cross_entropy": 2.87654321}
    (ws / "reports/evaluate.json").write_text(json.dumps({"seen": {"base": rec, "fine_tuned": rec}}))
    lines = console.results(ws)
    assert lines[2].split() == ["fine-tuned", "–", "–", "–"] and not any("Fine-tuned" in line for line in lines)


def test_stage_summary_lines_show_long_decimals_rounded():
    out = console.StageOutput("train")
    out.feed("2026-12-06 10:00:00,000 INFO stages.train.run: adapter written; eval CE 3.786388315473284; 103 tokens/s")
    assert out.summary == "adapter written; eval CE 3.786; 103 tokens/s"
