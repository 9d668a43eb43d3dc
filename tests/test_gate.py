"""The confidence gate: which rows train holds back to calibrate on, the threshold it keeps, and the adapter declining
below it wherever it answers closed-book (evaluate's generation, the apps), not with retrieval."""

from __future__ import annotations

import dataclasses
import json

from qrb.model import generate_answers, read_gate
from qrb.schema import ABSTAIN_ANSWER
from stages.train.gate import HOLD_ABSTAIN_EVERY, SLACK, calibrate, hold_back, threshold


def _rows():
    rows = []
    for f in range(3):
        rows += [{"question": f"q{f}-{v}", "answer": "A.", "kind": "fact", "fact_id": f"f{f}", "variant": v}
                 for v in range(4)]
    rows.append({"question": "lonely", "answer": "B.", "kind": "fact", "fact_id": "f9", "variant": 0})
    rows += [{"question": f"inv{i}", "answer": ABSTAIN_ANSWER, "kind": "abstain", "fact_id": f"i{i}", "variant": 0}
             for i in range(8)]
    return rows


def test_hold_back_one_later_wording_per_fact_and_a_share_of_abstention_rows():
    rows = _rows()
    keep, known, unknown = hold_back(rows, seed=7)
    assert [rows[i]["fact_id"] for i in known] == ["f0", "f1", "f2"]  # one each; f9 has a single wording
    assert all(rows[i]["variant"] > 0 for i in known)  # the first wording always trains
    assert len(unknown) == 8 // HOLD_ABSTAIN_EVERY and all(rows[i]["kind"] == "abstain" for i in unknown)
    assert sorted(keep + known + unknown) == list(range(len(rows))) and not set(keep) & set(known + unknown)
    assert hold_back(rows, seed=7) == (keep, known, unknown)
    assert any(hold_back(rows, seed=s)[1] != known for s in range(8))  # the seed picks the wording


def test_hold_back_takes_an_unknown_paper_whole():
    # a read paper's closed-book wordings share its DOI: holding one back while its siblings train would calibrate
    # on a decline learnt by rote, not on an unfamiliar paper
    rows = _rows()[:13] + [{"question": f"read{p}-{v}", "answer": ABSTAIN_ANSWER, "kind": "abstain", "doi": f"10/{p}",
                            "fact_id": f"r{p}-{v}", "variant": v} for p in range(8) for v in range(3)]
    _, _, unknown = hold_back(rows, seed=7)
    held = {rows[i]["doi"] for i in unknown}
    assert len(held) == 8 // HOLD_ABSTAIN_EVERY
    assert sorted(unknown) == sorted(i for i, r in enumerate(rows) if r.get("doi") in held)  # every wording of each


def test_threshold_keeps_the_lowest_value_within_a_row_of_the_best_score():
    known = [(0.95, "correct"), (0.7, "correct"), (0.5, "incorrect"), (0.2, "not_attempted")]
    unknown = [(0.6, False), (0.9, False), (0.3, True)]
    t, score = threshold(known, unknown)
    # at 0: +1 +1 -1 for the facts, -2 for the two unknown papers answered = -1; just above 0.5: +2 -2 = 0; just
    # above 0.6: +2 -1 = 1, the best; 0 is within one row of it and answers more
    assert SLACK == 1 and abs(t - 0.5) < 1e-3 and t > 0.5 and score == 0
    assert threshold([(0.9, "correct")], [(0.4, False), (0.4, False)])[0] > 0.4  # two rows better: worth declining
    assert threshold([(0.9, "correct")], [])[0] == 0.0  # nothing to decline: answer everything
    assert threshold([], [(0.4, False)])[0] == 0.0  # one row within the slack


def test_generate_answers_declines_below_the_gate_and_reports_confidences(tiny_model_dir):
    from qrb.model import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token  # an adapter's tokenizer has its own; the bare tiny one has none
    qs = ["What is a qubit?", "How many qubits?", "Who wrote it?"]
    conf: list[float] = []
    plain = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6)
    scored = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, confidences=conf)
    assert scored == plain and len(conf) == 3 and all(0 < c <= 1 for c in conf)
    assert generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, min_prob=0.0) == plain
    mid = sorted(conf)[1] + 1e-9
    gated = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, min_prob=mid)
    assert [a == ABSTAIN_ANSWER for a in gated] == [c < mid for c in conf]


def test_calibrate_writes_the_gate_the_apps_read(tiny_model_dir, tmp_path):
    from qrb.model import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token  # an adapter's tokenizer has its own; the bare tiny one has none
    rows = [{**r, "short_answer": "A", "aliases": []} for r in _rows()]
    _, known, unknown = hold_back(rows, seed=7)
    found = calibrate(model, tok, rows, known, unknown, "Be brief.", 4, tmp_path)
    assert json.loads((tmp_path / "gate.json").read_text()) == found
    assert read_gate(tmp_path) == found["min_prob"] and found["known"] == 3 and found["unknown"] == 2
    # an untrained model answers no held-back fact right: the best gate declines whatever it says
    assert found["known_kept_right"] == 0 and found["unknown_declined"] == 2
    assert read_gate(tmp_path / "missing") is None


def test_the_bot_declines_closed_book_below_its_gate_but_not_with_retrieval(bot):
    conversation = [{"role": "user", "content": "What does the paper report?"}]
    assert not bot.gated  # the fixture's adapter was trained without a gate
    sure = dataclasses.replace(bot, min_prob=1.01)  # no answer is that sure
    assert sure.gated and sure.generate(conversation, max_new_tokens=8).text == ABSTAIN_ANSWER
    reply, pieces = sure.stream(conversation, max_new_tokens=8)
    assert "".join(pieces) == ABSTAIN_ANSWER == reply.text
    open_book = dataclasses.replace(bot, min_prob=1.01, retriever=object())
    assert not open_book.gated
    assert dataclasses.replace(bot, min_prob=0.0).generate(conversation, max_new_tokens=8).text == \
        bot.generate(conversation, max_new_tokens=8).text
