"""The validated pairs as OpenAI chat fine-tuning JSON Lines: other trainers read them as they are."""

from __future__ import annotations

import json
import math

from helpers import SYSTEM, qa_rows
from stages.validate.openai_format import write_openai


def test_openai_jsonl_loads_with_datasets_and_trains_with_trl(tmp_path, corpus_dir, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = qa_rows(corpus_dir)[:24]
    write_openai(tmp_path, {"train": rows[:16], "eval": rows[16:]}, SYSTEM)
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first == {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": rows[0]["question"]},
                                  {"role": "assistant", "content": rows[0]["answer"]}]}

    ds = datasets.load_dataset("json", data_files={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "eval")})
    assert (ds["train"].num_rows, ds["eval"].num_rows) == (16, 8)
    assert ds["eval"][0]["messages"][2]["content"] == rows[16]["answer"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, max_length=128,
                     learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                     assistant_only_loss=False, activation_checkpointing=False, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["eval"],
                         processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
