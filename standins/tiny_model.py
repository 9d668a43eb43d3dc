"""Build the tiny Llama that stands in for Llama-3.1-8B-Instruct offline.

    python -m standins.tiny_model --corpus data/corpus --out models/tiny-llama

Trains a byte-level BPE tokenizer on the paper snapshot's titles and abstracts, builds a 2-layer Llama with Llama-3's
special tokens and chat template (and, like Llama 3.1, no pad token: the train stage adds one), and pre-trains it
briefly on the abstracts, so it is a (very small) language model rather than noise. Seeded and deterministic on CPU;
writes a standard transformers model folder of a few hundred KB.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qrb.io import read_jsonl

log = logging.getLogger(__name__)

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT]

# Llama-3's layout. `add_generation_prompt=True` output is an exact prefix of the full conversation, so trl's
# prompt/completion tokenisation trains on the same context that inference sees.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus_texts(corpus_dir: str | Path) -> list[str]:
    files = sorted(Path(corpus_dir).glob("*.jsonl"))
    if not files:
        raise SystemExit(f"tiny-model: no *.jsonl paper files in {corpus_dir}")
    texts = (" ".join(str(rec.get(k) or "") for k in ("title", "abstract")).strip()
             for path in files for rec in read_jsonl(path))
    return [t for t in texts if t]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
                                   additional_special_tokens=[EOS, HEADER_START, HEADER_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(corpus_dir: str | Path, out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024,
          hidden: int = 64, layers: int = 2, pretrain_steps: int = 150, tie_word_embeddings: bool = False) -> Path:
    """`tie_word_embeddings=True` builds a tied stand-in (one matrix for input embeddings and lm_head, as SmolLM2
    and other small models have), for the tests that train and export such a base."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(seed)
    torch.use_deterministic_algorithms(True)
    texts = corpus_texts(corpus_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,  # default untied, as Llama-3.1-8B (the recipe trains embed_tokens)
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)

    # Brief pre-training on the abstracts: 128-token windows, AdamW, deterministic order.
    ids = [tokenizer.bos_token_id]
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(EOS)]
    data = torch.tensor(ids)
    window, batch = 128, 16
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(pretrain_steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + window] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == pretrain_steps - 1:
            log.info("tiny-model pretrain step %d loss %.3f", step, loss.item())
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOS)],
        do_sample=False)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# tiny-llama (offline stand-in)\n\nA 2-layer Llama built by `python -m standins.tiny_model` from the paper "
        "snapshot in data/corpus (Quantum papers, CC BY 4.0). It stands in for Llama-3.1-8B-Instruct in the "
        "offline profile only; it is not a useful model.\n")
    log.info("tiny model (%d params, vocab %d) written to %s", model.num_parameters(), len(tokenizer), out)
    return out


def main(argv: list[str] | None = None) -> None:
    from qrb.io import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(prog="qrb tiny-model", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/corpus", help="the paper snapshot it learns from (default data/corpus)")
    ap.add_argument("--out", default="models/tiny-llama", help="the model folder to write (default models/tiny-llama)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the pre-training (default 0)")
    ap.add_argument("--pretrain-steps", type=int, default=150, help="pre-training steps on the abstracts (default 150)")
    ap.add_argument("--tie-word-embeddings", action="store_true", help="one matrix for embeddings and lm_head")
    args = ap.parse_args(argv)
    build(args.corpus, args.out, seed=args.seed, pretrain_steps=args.pretrain_steps,
          tie_word_embeddings=args.tie_word_embeddings)


if __name__ == "__main__":
    main()
