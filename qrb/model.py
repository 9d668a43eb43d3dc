"""What train and evaluate must agree on: the chat format, model loading, and how eval cross-entropy is counted.

Kept in one module so that the adapter is evaluated (and later served) with exactly the conversation layout it was
trained on: system prompt + user question -> assistant answer, rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError
from qrb.words import names_unknown_paper, word_set

log = logging.getLogger(__name__)


def prompt_messages(system_prompt: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def completion_messages(answer: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": answer}]


def require_hardware(model: str, precision: str) -> str:
    """Return the torch device; a ConfigError when the recipe's hardware is missing."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if precision in ("bf16", "fp16", "nf4"):
        raise ConfigError(
            f"precision {precision!r} for {model} needs a CUDA GPU and none is visible; "
            "run the offline CPU profile (`make demo`) or use a GPU machine")
    return "cpu"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "nf4": torch.bfloat16}[precision]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"cannot load tokenizer {path!r}: {_first_line(e)}") from None


def load_causal_lm(path: str, dtype=None, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        hint = "" if Path(path).exists() else " (a hub id: log in with `hf auth login` and check network access)"
        raise ConfigError(f"cannot load model {path!r}: {_first_line(e)}{hint}") from None


def resize_for_tokenizer(model, tokenizer) -> int:
    """Grow the embeddings for added tokens (the pad token), deterministically.

    New input and output rows are set to the mean of the existing rows, so train, evaluate and serve rebuild the
    very same base model and the adapter need not carry a copy of lm_head. Returns the number of rows added.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    added = len(tokenizer) - old
    if added <= 0:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] == len(tokenizer):
                emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    return added


def adapter_kind(adapter_dir: str | Path) -> str | None:
    """"peft" (a standard PEFT folder), "loreft" (qrb.loreft interventions) or None (no adapter there)."""
    kinds = {"peft": "adapter_config.json", "loreft": "loreft_config.json"}
    return next((kind for kind, name in kinds.items() if (Path(adapter_dir) / name).exists()), None)


def load_with_adapter(base_model: str, adapter_dir: str | Path, dtype=None):
    """Base model + the trained adapter, rebuilt exactly as train saw it: the adapter's tokenizer (with the added
    pad token), deterministically resized embeddings, then the PEFT adapter or LoReFT interventions.

    `model.disable_adapter()` gives the base model back in both cases.
    """
    kind = adapter_kind(adapter_dir)
    if kind is None:
        raise ConfigError(f"no adapter in {adapter_dir}: run the train stage first (dvc repro train)")
    tokenizer = load_tokenizer(str(adapter_dir))
    model = load_causal_lm(base_model, dtype=dtype)
    resize_for_tokenizer(model, tokenizer)
    if kind == "peft":
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # a tied base whose embedding the adapter trains: untied on purpose
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    else:
        from qrb import loreft

        model = loreft.load(model, adapter_dir)
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def encode_pair(tokenizer, system_prompt: str, question: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the full conversation and the length of its prompt part (loss is on the rest).

    The rest is the answer and its end-of-turn token (the tokenizer's eos): what a template writes after the end of
    turn (ChatML's newline after <|im_end|>) is never generated, so it is cut. Training tokenizes with this function
    too (stages.train.trainer.tokenize_rows), so train and eval count the very same tokens.
    """
    prompt = tokenizer.apply_chat_template(prompt_messages(system_prompt, question), tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages(system_prompt, question) + completion_messages(answer),
                                         tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the generation prompt is not a prefix of the full conversation")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if f_ids[:len(p_ids)] != p_ids:
        raise ValueError("chat template: the tokenized generation prompt is not a prefix of the tokenized "
                         "conversation (tokens merge across the prompt's end)")
    eot = tokenizer.eos_token_id
    if eot is not None and eot in f_ids[len(p_ids):]:
        f_ids = f_ids[:f_ids.index(eot, len(p_ids)) + 1]
    return f_ids[:max_length], min(len(p_ids), max_length)


def token_nll_rows(model, tokenizer, rows: Sequence[dict[str, str]], system_prompt: str, *, batch_size: int,
                   max_length: int, desc: str = "eval CE") -> list[tuple[float, int]]:
    """(summed NLL of the answer tokens, answer tokens) per row: right padding and loss on the answer only, as in
    training. Per row, so that evaluation can bootstrap an interval over questions."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = []
    model.eval()
    encoded = [encode_pair(tokenizer, system_prompt, r["question"], r["answer"], max_length) for r in rows]

    def padded(seqs: list[list[int]], value: int):  # right padding, as in training
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in seqs], batch_first=True, padding_value=value)

    for i in tqdm(range(0, len(encoded), batch_size), desc=desc, disable=len(encoded) <= batch_size):
        chunk = encoded[i:i + batch_size]
        input_ids = padded([ids for ids, _ in chunk], pad_id)
        attn = padded([[1] * len(ids) for ids, _ in chunk], 0)
        labels = padded([[-100] * plen + ids[plen:] for ids, plen in chunk], -100)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                                reduction="none").sum(dim=1)
        counts = (shift_labels != -100).sum(dim=1)
        out += [(float(a), int(b)) for a, b in zip(nll.tolist(), counts.tolist(), strict=True)]
    return out


def token_weighted_ce(model, tokenizer, rows: Sequence[dict[str, str]], system_prompt: str, *,
                      batch_size: int, max_length: int, desc: str = "eval CE") -> dict[str, float | None]:
    """Cross-entropy per answer token over all rows (not a mean of per-batch means), at a fixed batch size.

    This is the number methods are compared by; Trainer's eval_loss averages batch means and so depends on how
    rows fall into batches.
    """
    per_row = token_nll_rows(model, tokenizer, rows, system_prompt, batch_size=batch_size, max_length=max_length,
                             desc=desc)
    total_nll = sum(n for n, _ in per_row)
    total_tokens = sum(c for _, c in per_row)
    if not total_tokens:  # no eval set (or no answer token in it): no CE, never a 0.0 that reads as the best
        return {"cross_entropy": None, "perplexity": None, "tokens": 0}
    ce = total_nll / total_tokens
    return {"cross_entropy": ce, "perplexity": math.exp(min(ce, 50.0)), "tokens": total_tokens}


GATE_FILE = "gate.json"  # beside an adapter: what it declines (train calibrates it)


@dataclass(frozen=True)
class Gate:
    """An adapter's confidence gate: it declines an answer it was less sure of than `min_prob`, and a question that
    quotes the title of a paper it was not trained on (`papers`: the titles it was; none listed: no such check)."""
    min_prob: float
    papers: tuple[str, ...] = ()

    @cached_property
    def _titles(self) -> list[frozenset[str]]:
        return [word_set(t) for t in self.papers]

    def __call__(self, question: str, answer: str, confidence: float) -> str:
        from qrb.schema import ABSTAIN_ANSWER

        unknown = confidence < self.min_prob or names_unknown_paper(question, self._titles)
        return ABSTAIN_ANSWER if unknown else answer


def read_gate(adapter_dir: str | Path) -> Gate | None:
    """The adapter's gate (gate.json), or None: no gate (none calibrated, or an older adapter)."""
    path = Path(adapter_dir) / GATE_FILE
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    return Gate(found["min_prob"], tuple(found.get("papers", ())))


def token_confidence(logits: Sequence, new_ids, stop_ids: set[int]) -> list[float]:
    """Per answer: the probability of its least likely token, up to and including its end token (the model's own
    unwarped distribution: `logits` as generate(output_logits=True) returns them, one tensor per step)."""
    import torch

    probs = torch.stack([torch.softmax(step.float(), -1) for step in logits], 1)  # batch, steps, vocab
    chosen = probs.gather(2, new_ids[:, :probs.shape[1]].unsqueeze(-1)).squeeze(-1)
    out = []
    for row, ids in zip(chosen, new_ids.tolist()):
        n = next((k + 1 for k, t in enumerate(ids) if t in stop_ids), len(ids))
        out.append(float(row[:n].min()) if n else 1.0)
    return out


def generate_answers(model, tokenizer, questions: Sequence[str], system_prompt: str, *, batch_size: int,
                     max_new_tokens: int, greedy: bool = True, desc: str = "generate", gate: Gate | None = None,
                     confidences: list[float] | None = None) -> list[str]:
    """Batched generation with left padding (right padding would put pads between prompt and answer). `gate`: what
    the answers pass (`token_confidence` is its confidence); `confidences`: a list to append each answer's to."""
    import torch
    from tqdm.auto import tqdm

    scored = gate is not None or confidences is not None
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, disable=len(questions) <= batch_size):
        batch = questions[i:i + batch_size]
        prompts = [tokenizer.apply_chat_template(prompt_messages(system_prompt, q), tokenize=False,
                                                 add_generation_prompt=True) for q in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                 pad_token_id=tokenizer.pad_token_id, output_logits=scored,
                                 return_dict_in_generate=True)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        texts = [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
        if scored:
            conf = token_confidence(out.logits, new, stop_ids)
            if gate is not None:
                texts = [gate(q, t, c) for q, t, c in zip(batch, texts, conf)]
            if confidences is not None:
                confidences += conf
        answers += texts
    return answers
