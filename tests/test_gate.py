"""The confidence gate: which rows train holds back to calibrate on, the threshold it keeps, the titles it knows, and
the adapter declining below it, or a question quoting a title it does not know, wherever it answers closed-book
(evaluate's generation, the apps), not with retrieval."""

from __future__ import annotations

import dataclasses
import json

from qrb.model import Gate, generate_answers, read_gate
from qrb.schema import ABSTAIN_ANSWER
from stages.train.gate import DECLINE_UNKNOWN, HOLD_ABSTAIN_EVERY, calibrate, hold_back, threshold


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


def test_threshold_is_the_lowest_that_declines_the_share_of_unknown_questions():
    """CI's smol-full run: a score of +1 per known fact kept right, -1 per unknown question answered, chose 0.88 and
    declined 54% of the seen questions, which the model answers less surely than the held-back wordings it scored."""
    assert DECLINE_UNKNOWN == 0.85
    declined = [(0.1, True)] * 14  # the model declines 14 of 20 itself: 3 more to decline, 3 may stand
    answered = [(0.2, False), (0.3, False), (0.45, False), (0.6, False), (0.8, False), (0.99, False)]
    t = threshold(declined + answered)
    assert 0.45 < t < 0.46  # declines 0.2, 0.3 and 0.45: 17 of 20
    assert sum(d or c < t for c, d in declined + answered) == 17
    assert threshold([(0.1, True)] * 17 + answered[3:]) == 0.0  # 17 of 20 declined already: answer the rest
    assert threshold([]) == 0.0 and threshold([(0.4, False)]) > 0.4  # one row: it must go


def test_generate_answers_declines_below_the_gate_and_reports_confidences(tiny_model_dir):
    from qrb.model import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token  # an adapter's tokenizer has its own; the bare tiny one has none
    qs = ["What is a qubit?", "How many qubits?", "Who wrote it?"]
    conf: list[float] = []
    plain = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6)
    scored = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, confidences=conf)
    assert scored == plain and len(conf) == 3 and all(0 < c <= 1 for c in conf)
    assert generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, gate=Gate(0.0)) == plain
    mid = sorted(conf)[1] + 1e-9
    gated = generate_answers(model, tok, qs, "Be brief.", batch_size=2, max_new_tokens=6, gate=Gate(mid))
    assert [a == ABSTAIN_ANSWER for a in gated] == [c < mid for c in conf]
    titled = [f'In "{t}", how many qubits?' for t in ("Quantum walks on graphs", "Error thresholds of toric codes")]
    gated = generate_answers(model, tok, titled, "Be brief.", batch_size=2, max_new_tokens=6,
                             gate=Gate(0.0, ("Quantum walks on graphs",)))
    assert gated[0] != ABSTAIN_ANSWER and gated[1] == ABSTAIN_ANSWER  # a paper it was not trained on: declined


def test_the_gate_declines_a_quoted_title_it_was_not_trained_on():
    """Invented questions that quote a made-up title but ask a real fact ("... of what et al?", according to "<two
    halves of real titles>") were answered with the fact, and surely: no threshold on confidence declines them."""
    gate = Gate(0.5, ("Grothendieck inequalities characterize converses to the polynomial method",))
    fact = "Aaronson."
    assert gate('Which surprising converse is named after whom, according to "Grothendieck inequalities '
                'characterize converses to the polynomial method"?', fact, 0.97) == fact
    assert gate('... according to "Grothendieck Inequalities Characterise Converses to the Polynomial Method"?',
                fact, 0.97) == fact  # case and a changed word: the same paper
    assert gate('A surprising converse of what et al, according to "Operational Quantum Mereology to the '
                'polynomial method"?', fact, 0.97) == ABSTAIN_ANSWER  # spliced from two real titles
    assert gate('In the statement "Researchers introduce ___ to approximate tensor networks", what fills the '
                'blank?', fact, 0.97) == fact  # a fill-in-the-blank is not a title
    assert gate('According to "the loop Hafnian"?', fact, 0.97) == fact  # under four words: a term, not a title
    assert gate('What is "the loop Hafnian function"?', fact, 0.97) == fact  # no word naming a paper before it
    assert gate('In "Grothendieck inequalities characterize converses to the polynomial method", how many?', fact,
                0.3) == ABSTAIN_ANSWER  # below min_prob, as before
    assert Gate(0.0)('In "Some paper it never saw at all", what?', fact, 0.9) == fact  # no titles listed: no check


def test_calibrate_writes_the_gate_the_apps_read(tiny_model_dir, tmp_path):
    from qrb.model import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.pad_token or tok.eos_token  # an adapter's tokenizer has its own; the bare tiny one has none
    rows = [{**r, "short_answer": "A", "aliases": []} for r in _rows()]
    _, known, unknown = hold_back(rows, seed=7)
    rows = [{**r, "title": "Quantum walks on graphs"} if r["kind"] == "fact" else r for r in rows]
    rows.append({"question": "Who?", "answer": "B.", "kind": "raft", "title": "Only read, never trained"})
    found = calibrate(model, tok, rows, known, unknown, "Be brief.", 4, tmp_path)
    written = json.loads((tmp_path / "gate.json").read_text())
    assert written == {**found, "papers": ["Quantum walks on graphs"]} and found["papers"] == 1
    assert read_gate(tmp_path) == Gate(found["min_prob"], ("Quantum walks on graphs",))
    assert found["known"] == 3 and found["unknown"] == 2
    # an untrained model answers no held-back fact right: the best gate declines whatever it says
    assert found["known_kept_right"] == 0 and found["unknown_declined"] == 2
    assert read_gate(tmp_path / "missing") is None


def test_the_bot_declines_closed_book_below_its_gate_but_not_with_retrieval(bot):
    conversation = [{"role": "user", "content": "What does the paper report?"}]
    assert not bot.gated  # the fixture's adapter was trained without a gate
    sure = dataclasses.replace(bot, gate=Gate(1.01))  # no answer is that sure
    assert sure.gated and sure.generate(conversation, max_new_tokens=8).text == ABSTAIN_ANSWER
    reply, pieces = sure.stream(conversation, max_new_tokens=8)
    assert "".join(pieces) == ABSTAIN_ANSWER == reply.text
    open_book = dataclasses.replace(bot, gate=Gate(1.01), retriever=object())
    assert not open_book.gated
    assert dataclasses.replace(bot, gate=Gate(0.0)).generate(conversation, max_new_tokens=8).text == \
        bot.generate(conversation, max_new_tokens=8).text
    knows = dataclasses.replace(bot, gate=Gate(0.0, ("Quantum walks on graphs",)))
    asked = [*conversation, {"role": "assistant", "content": "Which paper?"},
             {"role": "user", "content": 'In "Error thresholds of toric codes", what does it report?'}]
    assert knows.generate(asked, max_new_tokens=8).text == ABSTAIN_ANSWER  # the last question names an unknown paper
    assert knows.generate(conversation, max_new_tokens=8).text == bot.generate(conversation, max_new_tokens=8).text
