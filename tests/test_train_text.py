"""Train on the papers' text beside the QA rows (`train.text`): rule-based rewrites, the training papers only, the
loss on every token of a text row and on the answer of a QA row, mixed or staged."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import SYSTEM, abstract_sentences, base_of, cpu_recipe, qa_rows
from stages.train.trainer import TextParams, order_rows, text_rows, third_person, versions

PAPER = {"doi": "10.22331/q-2024-01-01-1", "title": "Shallow circuits",
         "abstract": "We prove a bound. Our method uses 56 qubits. The US grid is not involved. Numerics confirm it.",
         "full_text": "In Section 2 we show the proof. Let us recall $T_2$."}


def text_params(**kw) -> TextParams:
    return dataclasses.replace(TextParams(share=0.5, rewrites=3, order="mixed"), **kw)


def test_rewrites_are_third_person_seeded_shuffles_with_the_title():
    assert third_person("We show our bound; let us recall ours. The US and Ourense.") == \
        "The authors show their bound; let them recall theirs. The US and Ourense."
    v = versions(PAPER, 3, seed=7)
    assert len(v) == 4 and v[0] == f"Shallow circuits\n\n{PAPER['abstract']}\n\n{PAPER['full_text']}"
    assert v[1].count("Shallow circuits: ") == 6, "odd rewrites: the title before each of the 6 sentences"
    assert "The authors prove a bound." in v[1] and "Their method uses 56 qubits." in v[1] and "The US grid" in v[1]
    assert v[2].startswith("Shallow circuits\n\n") and v[2].count("Shallow circuits") == 1, "even: on top"
    assert versions(PAPER, 3, seed=7) == v and versions(PAPER, 3, seed=8) != v, "seeded"
    assert v[2].split("\n\n")[1] != versions(PAPER, 4, seed=7)[4].split("\n\n")[1], "each rewrite reshuffled"


def papers_and_rows(corpus_dir):
    papers = [{"doi": rec["doi"] or rec["title"], "title": rec["title"], "abstract": rec["abstract"], "full_text": ""}
              for rec, _ in abstract_sentences(corpus_dir)]
    rows = qa_rows(corpus_dir)
    held_out = {r["doi"] for r in rows[-8:]}
    return papers, [r for r in rows if r["doi"] not in held_out], [r for r in rows if r["doi"] in held_out]


def test_text_rows_come_from_training_papers_only_never_held_out_ones(tiny_model_dir, corpus_dir):
    from datasets import Dataset, DatasetDict

    from qrb.model import load_tokenizer

    papers, train_rows, eval_rows = papers_and_rows(corpus_dir)
    leak = dict(eval_rows[0])  # a held-out paper's row that slipped into train: its text still stays out
    ds = DatasetDict(train=Dataset.from_list(train_rows + [leak]), eval=Dataset.from_list(eval_rows),
                     papers=Dataset.from_list(papers + [{**PAPER, "title": "Never asked about"}]))
    tok = load_tokenizer(str(tiny_model_dir))
    rows = text_rows(ds, tok, text_params(share=0.75, rewrites=1), n_qa=len(train_rows), max_length=64, seed=7)
    assert len(rows) == 3 * len(train_rows)  # share 0.75 of all rows
    text = "\n".join(tok.decode(r["input_ids"]) for r in rows)
    titles = {p["doi"]: p["title"] for p in papers}
    held_out = {r["doi"] for r in eval_rows}
    assert all(titles[d][:30] not in text for d in held_out) and "Never asked about" not in text
    assert all(t[:30] in text for d, t in titles.items() if d not in held_out), "every training paper appears"
    assert all(r["completion_mask"] == [1] * len(r["input_ids"]) and 1 < len(r["input_ids"]) <= 64 for r in rows)
    with pytest.raises(ValueError, match="papers"):
        text_rows(DatasetDict(train=ds["train"]), tok, text_params(), 4, 64, 7)


def test_order_mixes_or_stages_the_parts_over_all_epochs(tiny_model_dir, tmp_path):
    from stages.train.trainer import sft_config

    qa, text = [f"q{i}" for i in range(6)], [f"t{i}" for i in range(4)]
    assert order_rows(qa, text, text_params(order="mixed"), 2.0, 7) == qa + text  # the sampler shuffles each epoch
    staged = order_rows(qa, text, text_params(order="qa_first"), 2.0, 7)
    assert sorted(staged[:12]) == sorted(qa * 2) and sorted(staged[12:]) == sorted(text * 2)
    assert staged[:6] != staged[6:12], "each epoch reshuffled"
    staged = order_rows(qa, text, text_params(order="text_first"), 1.5, 7)  # 1.5 epochs of each: 6 + 9 rows
    assert len(staged) == 15 and set(staged[:6]) <= set(text) and set(staged[6:]) == set(qa)
    args = sft_config(base_of(tiny_model_dir), cpu_recipe(text=text_params(order="qa_first")), str(tmp_path), False)
    assert args.train_sampling_strategy == "sequential" and args.num_train_epochs == 1.0
    args = sft_config(base_of(tiny_model_dir), cpu_recipe(text=text_params()), str(tmp_path), False)
    assert args.train_sampling_strategy == "group_by_length" and args.num_train_epochs == cpu_recipe().epochs


def mixed_trainer(tiny_model_dir, corpus_dir, tmp_path, **overrides):
    from datasets import Dataset, DatasetDict

    from qrb.model import load_tokenizer
    from stages.train.trainer import build_model, build_trainer, prepare_tokenizer

    papers, train_rows, eval_rows = papers_and_rows(corpus_dir)
    p = cpu_recipe(**{"text": text_params(share=0.5, rewrites=1), **overrides})
    tok, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    model = build_model(base_of(tiny_model_dir), p, tok, "cpu")
    ds = DatasetDict(train=Dataset.from_list(train_rows[:8]), eval=Dataset.from_list(eval_rows),
                     papers=Dataset.from_list(papers))
    return build_trainer(base_of(tiny_model_dir), p, model, tok, ds, tmp_path), tok, p


def test_text_rows_carry_the_loss_on_every_token_and_qa_rows_on_the_answer_only(tiny_model_dir, corpus_dir, tmp_path):
    from qrb.model import encode_pair

    trainer, tok, _ = mixed_trainer(tiny_model_dir, corpus_dir, tmp_path)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    qa = {tuple(encode_pair(tok, SYSTEM, r["question"], r["answer"], 192)[0]): r for r in
          papers_and_rows(corpus_dir)[1][:8]}
    kinds = {"qa": 0, "text": 0}
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        n = sum(mask)
        assert labels[n:] == [-100] * (len(ids) - n)
        if tuple(ids[:n]) in qa:
            kinds["qa"] += 1
            p_len = encode_pair(tok, SYSTEM, qa[tuple(ids[:n])]["question"], "", 192)[1]
            assert labels[:p_len] == [-100] * p_len and labels[p_len:n] == ids[p_len:n]
        else:
            kinds["text"] += 1
            assert labels[:n] == ids[:n], "a text row is trained on every token"
    assert kinds == {"qa": 8, "text": 8}


def test_text_training_moves_the_adapter_and_keeps_the_base_frozen(tiny_model_dir, corpus_dir, tmp_path):
    from helpers import assert_embedding_trained_and_the_rest_frozen
    from stages.train.trainer import neftune

    trainer, tok, p = mixed_trainer(tiny_model_dir, corpus_dir, tmp_path, epochs=1.0, batch_size=4,
                                    checkpoint_steps=0, text=text_params(share=0.5, rewrites=1, order="text_first"))
    with neftune(trainer, p, tok.pad_token_id):
        trainer.train()
    assert trainer.state.global_step == 4  # 8 text rows, then 8 QA rows
    assert_embedding_trained_and_the_rest_frozen(trainer.model, tiny_model_dir, tok)


def test_the_stage_reads_the_papers_only_when_text_is_on(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    from qrb.errors import ConfigError
    from stages.train import run

    _, train_rows, _ = papers_and_rows(corpus_dir)
    DatasetDict(train=Dataset.from_list(train_rows[:4])).save_to_disk(tmp_path / "artifacts/validate/dataset")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="papers.jsonl not found"):
        run.run(base_of(tiny_model_dir), cpu_recipe(text=text_params()), None)
