"""GGUF for llama.cpp, Ollama and LM Studio: a merged Llama-architecture model folder (artifacts/export/merged) written
as one .gguf file, Q8_0 or F16, with the `gguf` package's writer and numpy quantizers (no llama.cpp checkout), and
the Ollama Modelfile that runs it with the model's own chat template, system prompt and stop tokens.

`write_gguf(folder, file, kind)` follows llama.cpp's `convert_hf_to_gguf.py` for Llama: `llama.*` hyper-parameters,
the byte-level BPE tokenizer as `tokenizer.ggml.*` (tokens, types, merges, special ids incl. the added pad token,
the pre-tokenizer's name, the chat template), Q/K rows permuted to llama.cpp's rotary layout, Llama-3.1's rope
scaling as a `rope_freqs` tensor, and `output.weight` only for an untied model. `load_gguf` reads it back with
transformers' GGUF loader (an independent reader: it undoes the permutation, so a wrong one shows in eval CE).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from qrb.errors import ConfigError

NOT_LLAMA = "GGUF export writes the Llama architecture only (set `export.gguf: none` for other bases)"
# the Llama-3 split regex (its tokenizer.json and llama.cpp's "llama-bpe" pre-tokenizer)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (it picks the split regex by this name)."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ConfigError(f"GGUF export: pre-tokenizer {kinds} is not one llama.cpp names here (gpt-2, smollm, "
                      "llama-bpe); set `export.gguf: none`")


def rope_factors(rp: dict, head_dim: int) -> list[float]:
    """Llama-3.1's rope scaling as llama.cpp applies it: one divisor per rotary frequency (its converter's formula)."""
    base, factor = rp.get("rope_theta", 10000.0), rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def permute(w, n_head: int):
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head: the converter's `permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer itself puts a BOS before, and an EOS after, encoded text."""
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    extra = len(full) - len(plain)
    return (extra > 0 and full[0] == tokenizer.bos_token_id, extra > 0 and full[-1] == tokenizer.eos_token_id)


def add_tokenizer(w, folder: Path, tokenizer, n_vocab: int) -> None:
    import gguf

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers only (Llama 3, SmolLM2); set "
                          "`export.gguf: none`")
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    types = [gguf.TokenType.UNUSED if i not in vocab else gguf.TokenType.NORMAL if i not in added
             else gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tok_json))
    w.add_token_list([vocab.get(i, f"[PAD{i}]") for i in range(n_vocab)])  # rows past the tokenizer: padding
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, special_token_types=("bos", "eos", "unk", "pad"))
    # written explicitly: llama.cpp and Ollama add a BOS when the key is missing
    special.add_special_token = dict(zip(("bos", "eos"), adds_special(tokenizer)))
    special.add_to_gguf(w, quiet=True)


def write_gguf(folder: Path, out_file: Path, kind: str) -> dict:
    """The model folder as one GGUF file of `kind` (q8_0, f16); returns {tensor type: count}."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    if cfg.model_type != "llama":
        raise ConfigError(f"{NOT_LLAMA}; this model is {cfg.model_type!r}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"GGUF export: rope type {rope_type!r} is not written here (default and llama3 are)")
    qtype, ftype = {"q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
                    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16)}[kind]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file and key at info level
    w = gguf.GGUFWriter(out_file, "llama")
    for key, value in (("name", out_file.stem), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("block_count", cfg.num_hidden_layers),
                       ("feed_forward_length", cfg.intermediate_size), ("head_count", heads),
                       ("head_count_kv", kv_heads), ("key_length", head_dim), ("value_length", head_dim),
                       ("rope_dimension_count", head_dim),
                       ("rope_freq_base", float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))),
                       ("layer_norm_rms_eps", cfg.rms_norm_eps), ("vocab_size", cfg.vocab_size),
                       ("file_type", ftype), ("quantization_version", gguf.GGML_QUANT_VERSION)):
        getattr(w, f"add_{key}")(value)  # llama.* keys, as llama.cpp's converter writes them
    add_tokenizer(w, folder, AutoTokenizer.from_pretrained(folder), cfg.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    counts: dict[str, int] = {}

    def add(name: str, data) -> None:
        t = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype  # norms and biases stay f32, as llama.cpp's
        try:
            q = gguf.quants.quantize(data, t)
        except gguf.QuantError:  # a row not a multiple of Q8_0's 32-value block: f16, as llama.cpp's converter does
            t, q = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        w.add_tensor(name, q, raw_dtype=t)
        counts[t.name] = counts.get(t.name, 0) + 1

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: llama.cpp uses token_embd for the output when output.weight is absent
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConfigError(f"GGUF export: no llama.cpp name for tensor {key!r}")
                data = st.get_tensor(key).float().numpy()
                n_head = {"q_proj": heads, "k_proj": kv_heads}.get(key.rsplit(".", 2)[-2])
                add(name, permute(data, n_head) if n_head else data)
    if rope_type == "llama3":
        add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            np.asarray(rope_factors(rp, head_dim), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def load_gguf(path: Path, source: Path | None = None, dtype=None):
    """(model, tokenizer) read back by transformers' GGUF loader, dequantized. It ignores `rope_freqs`, so a llama3
    rope model takes its rope parameters from the `source` folder's config (the tensor itself is tested)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {}
    rp = (getattr(AutoConfig.from_pretrained(source), "rope_parameters", None) or {}) if source else {}
    if rp.get("rope_type") == "llama3":
        kw["config"] = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        kw["config"].rope_parameters = rp
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ---- Ollama ---------------------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def chat_parts(tokenizer) -> tuple[str, dict[str, tuple[str, str]], str]:
    """(lead, {role: (before, after)}, generation prompt): the chat template renders any conversation that starts
    with a system message as lead + Σ before[role] + content + after[role] (+ the generation prompt).

    Found by rendering marker contents; checked on a second turn, so a template that is not such a concatenation
    (one that treats a later turn differently) is refused rather than translated wrongly.
    """
    mark = {r: f"\x01{r}\x01" for r in ROLES}
    turns = [("system", ""), ("user", ""), ("assistant", ""), ("user", "2"), ("assistant", "2"), ("user", "3")]

    def render(upto: int, gen: bool = False) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": mark[r] + n} for r, n in turns[:upto]],
                                             tokenize=False, add_generation_prompt=gen)

    parts, prev = {}, ""
    for i, role in enumerate(ROLES):
        text = render(i + 1)
        if not text.startswith(prev) or text.count(mark[role]) != 1:
            raise ConfigError(f"the chat template does not render a {role} message after the earlier ones: no "
                              "Ollama template can be written (set `export.gguf: none`)")
        before, _, after = text[len(prev):].partition(mark[role])
        parts[role], prev = (before, after), text
    gen = render(2, gen=True)[len(render(2)):]
    bos = tokenizer.bos_token or ""  # a BOS before the first message only (Llama 3's; ChatML's bos opens every turn)
    lead = bos if bos and parts["system"][0].startswith(bos) and not parts["user"][0].startswith(bos) else ""
    parts["system"] = (parts["system"][0][len(lead):], parts["system"][1])
    if lead + "".join(parts[r][0] + mark[r] + n + parts[r][1] for r, n in turns) + gen != render(len(turns), gen=True):
        raise ConfigError("the chat template renders later turns differently from the first: no Ollama template "
                          "can be written (set `export.gguf: none`)")
    return lead, parts, gen


def ollama_template(tokenizer, add_bos: bool) -> str:
    """The chat template in Ollama's Go template syntax (system messages are part of .Messages in Ollama)."""
    lead, parts, gen = chat_parts(tokenizer)
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{b}{{{{ .Content }}}}{a}'
                       for i, (r, (b, a)) in enumerate(parts.items()))
    text = f"{'' if add_bos else lead}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{gen}"
    if any(s in x for x in (lead, gen, *[p for ba in parts.values() for p in ba]) for s in ("{{", '"""')):
        raise ConfigError('the chat template\'s text holds "{{" or \'"""\': it cannot be quoted in a Modelfile')
    return text


def modelfile(gguf_name: str, tokenizer, add_bos: bool, system_prompt: str, num_ctx: int,
              stop_ids: list[int]) -> str:
    stops = sorted({tokenizer.convert_ids_to_tokens(i) for i in stop_ids})
    lines = ["# ollama create <name> -f Modelfile  (docs/serving.md)", f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(tokenizer, add_bos)}"""', f'SYSTEM """{system_prompt}"""',
             *[f'PARAMETER stop "{s}"' for s in stops],
             "PARAMETER temperature 0",  # greedy, as evaluate scored it
             f"PARAMETER num_ctx {num_ctx}"]  # base.max_length: the longest conversation it was trained on
    return "\n".join(lines) + "\n"
