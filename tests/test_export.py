"""Export: the merge is exact (same eval CE and logits as base + adapter); the GGUF (Q8_0, F16) reads back with
transformers' GGUF loader within 0.02 / 1e-3 eval CE of the merge and its Modelfile renders the model's own chat
template; no 4-bit merge, no LoReFT merge, no Hub repo without its token."""

from __future__ import annotations

import json
import os
import re

import pytest

from qrb.errors import ConfigError


@pytest.fixture(scope="module")
def exported(adapter_ws, tmp_path_factory):
    from qrb.io import read_jsonl
    from qrb.params import load_params
    from stages import export as ex

    base, p = load_params(ex.SECTION, ex.PARAMS_CLASS, ex.BASE_KEYS, adapter_ws / "params.yaml")
    rows = list(read_jsonl(adapter_ws / "artifacts" / "validate" / "eval.jsonl"))[:8]
    card = tmp_path_factory.mktemp("card")
    (card / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# card\n")
    out = tmp_path_factory.mktemp("export")
    metrics = ex.export(base, p, rows, "cpu", adapter_dir=adapter_ws / "artifacts" / "train" / "adapter",
                        card_dir=card, out=out)
    return base, p, rows, out, metrics


def test_merge_is_exact_and_loads_without_peft(exported, adapter_ws):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qrb.model import load_causal_lm, load_tokenizer, resize_for_tokenizer

    base, p, rows, out, m = exported
    assert p.merge_precision == "fp32"  # profiles/tiny.yaml: CPU
    assert abs(m["merge_ce_delta"]) < 1e-4 and m["eval_ce"]["merged"] > 0 and m["eval_tokens"] > 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = adapter_ws / "artifacts" / "train" / "adapter"
    tok = load_tokenizer(str(adapter))
    ref = load_causal_lm(base["model"])
    resize_for_tokenizer(ref, tok)
    ref = PeftModel.from_pretrained(ref, str(adapter)).eval()
    ids = tok("What is a qubit?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-4)
        with ref.disable_adapter():  # the adapter did change the model: the comparison means something
            assert not torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-3)
    assert (out / "adapter" / "README.md").exists() and (out / "adapter" / "adapter_config.json").exists()


def gguf_ce(path, rows, base, p):
    from qrb.gguf_export import load_gguf
    from qrb.model import token_weighted_ce

    model, tok = load_gguf(path)  # the GGUF's own tokenizer and chat template, as llama.cpp would use them
    return token_weighted_ce(model, tok, rows, base["system_prompt"], batch_size=p.eval_batch_size,
                             max_length=base["max_length"])["cross_entropy"]


def test_gguf_q8_0_reads_back_within_0_02_of_the_merge_and_f16_within_1e_3(exported, tmp_path):
    from gguf import GGUFReader

    from qrb.gguf_export import write_gguf

    base, p, rows, out, m = exported
    assert p.gguf == "q8_0" and m["gguf_file"].endswith("-qrb-q8_0.gguf")
    f = out / "gguf" / m["gguf_file"]
    assert m["size_bytes"]["gguf"] == f.stat().st_size < 0.5 * m["size_bytes"]["merged"]  # Q8_0 vs the fp32 merge
    assert abs(m["gguf_ce_delta"]) < 0.02 and m["gguf_ce_delta"] == m["eval_ce"]["gguf"] - m["eval_ce"]["merged"]
    assert gguf_ce(f, rows, base, p) == pytest.approx(m["eval_ce"]["gguf"], abs=1e-6)
    reader = GGUFReader(f)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert "output.weight" in types  # the tiny base is untied
    f16 = tmp_path / "m-f16.gguf"
    assert set(write_gguf(out / "merged", f16, "f16")) == {"F16", "F32"}
    assert abs(gguf_ce(f16, rows, base, p) - m["eval_ce"]["merged"]) < 1e-3


def test_gguf_without_the_q_k_permutation_is_caught_by_the_read_back(exported, tmp_path, monkeypatch):
    """The read-back undoes llama.cpp's Q/K layout: a file written without it scores visibly worse."""
    from qrb import gguf_export

    base, p, rows, out, m = exported
    monkeypatch.setattr(gguf_export, "permute", lambda w, n_head: w)
    gguf_export.write_gguf(out / "merged", tmp_path / "bad.gguf", "f16")
    assert abs(gguf_ce(tmp_path / "bad.gguf", rows, base, p) - m["eval_ce"]["merged"]) > 1e-2


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    """The subset of Go's text/template that the Modelfile uses (range .Messages; if / else if eq .Role "x"; end;
    .Content; .Role), as Ollama executes it: system messages are part of .Messages."""
    assert "{{-" not in template and "-}}" not in template
    toks = re.split(r"{{\s*(.*?)\s*}}", template)  # text, action, text, action, ...

    def parse(i: int):
        nodes: list = []
        while i < len(toks):
            tok, is_action = toks[i], i % 2 == 1
            i += 1
            if not is_action:
                nodes.append(("text", tok))
            elif tok == "end" or tok.startswith("else"):
                return nodes, i, tok
            elif tok == "range .Messages":
                body, i, stop = parse(i)
                assert stop == "end"
                nodes.append(("range", body))
            elif m := re.fullmatch(r'if eq \.Role "(\w+)"', tok):
                branches, role = [], m[1]
                while True:
                    body, i, stop = parse(i)
                    branches.append((role, body))
                    if stop == "end":
                        break
                    role = re.fullmatch(r'else if eq \.Role "(\w+)"', stop)[1]
                nodes.append(("if", branches))
            else:
                assert tok in (".Content", ".Role"), f"action outside the subset: {tok!r}"
                nodes.append(("field", tok[1:].lower()))
        return nodes, i, None

    def render(nodes, msg=None) -> str:
        out = ""
        for kind, val in nodes:
            if kind == "text":
                out += val
            elif kind == "field":
                out += msg[val]
            elif kind == "range":
                out += "".join(render(val, m) for m in messages)
            else:
                out += next((render(body, msg) for role, body in val if role == msg["role"]), "")
        return out

    return render(parse(0)[0])


def modelfile_fields(text: str) -> dict:
    quoted = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.S | re.M))
    return {**quoted, "FROM": re.search(r"^FROM (.+)$", text, re.M)[1],
            "stop": re.findall(r'^PARAMETER stop "(.+)"$', text, re.M),
            "params": dict(re.findall(r"^PARAMETER (temperature|num_ctx) (\S+)$", text, re.M))}


def assert_modelfile_renders_the_chat_template(text: str, tokenizer) -> None:
    """Two turns through the Modelfile's TEMPLATE give the very text the model's own chat template gives (with the
    BOS the GGUF's tokenizer adds itself, where it does)."""
    from qrb.gguf_export import adds_special

    f = modelfile_fields(text)
    conv = [{"role": "system", "content": f["SYSTEM"]}, {"role": "user", "content": "What is a qubit?"},
            {"role": "assistant", "content": "A two-level quantum system."},
            {"role": "user", "content": "Who proposed the surface code?"}]
    want = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token if adds_special(tokenizer)[0] else ""
    assert bos + go_render(f["TEMPLATE"], conv) == want
    assert tokenizer.eos_token in f["stop"]


def test_modelfile_runs_the_gguf_with_the_models_chat_template_system_prompt_and_stops(exported):
    from transformers import AutoTokenizer

    base, _, _, out, m = exported
    text = (out / "gguf" / "Modelfile").read_text()
    f = modelfile_fields(text)
    assert f["FROM"] == f"./{m['gguf_file']}" and f["SYSTEM"] == base["system_prompt"]
    assert f["params"] == {"temperature": "0", "num_ctx": str(base["max_length"])}
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert set(f["stop"]) == {"<|eot_id|>", "<|end_of_text|>"}  # the tiny Llama-3 layout's two end tokens
    assert_modelfile_renders_the_chat_template(text, tok)  # Llama 3's header layout, BOS written by the template


def test_modelfile_of_smollm2_renders_its_chatml_template(smol_model_dir):
    from transformers import AutoTokenizer

    from qrb.gguf_export import adds_special, modelfile

    tok = AutoTokenizer.from_pretrained(smol_model_dir)
    text = modelfile("s.gguf", tok, adds_special(tok)[0], "You answer questions about Quantum papers.", 512,
                     [tok.eos_token_id])
    assert modelfile_fields(text)["stop"] == ["<|im_end|>"]
    assert_modelfile_renders_the_chat_template(text, tok)


def test_llama31_rope_scaling_is_written_as_rope_freqs(tiny_model_dir, tmp_path):
    """Llama-3.1's rope scaling: llama.cpp reads it from a `rope_freqs` tensor; its values are the divisors
    transformers applies to each rotary frequency, and the read-back model gives the same logits."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qrb.gguf_export import load_gguf, write_gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters=rope, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "l31")
    tok.save_pretrained(tmp_path / "l31")
    write_gguf(tmp_path / "l31", tmp_path / "l31.gguf", "f16")
    freqs = next(t for t in GGUFReader(tmp_path / "l31.gguf").tensors if t.name == "rope_freqs.weight")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(torch.tensor(freqs.data.copy()), plain / scaled, rtol=1e-5)
    assert {1.0, 8.0} < set(torch.tensor(freqs.data.copy()).tolist())  # some unscaled, some scaled, some between
    reread, _ = load_gguf(tmp_path / "l31.gguf", tmp_path / "l31")
    ids = tok("What is a qubit and how is it measured?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reread(ids).logits, model(ids).logits, atol=1e-2)


@pytest.fixture(scope="module")
def tied_tiny_dir(tmp_path_factory, corpus_dir):
    from standins import tiny_model

    return tiny_model.build(corpus_dir, tmp_path_factory.mktemp("tied-tiny"), seed=0, pretrain_steps=40,
                            tie_word_embeddings=True)


def test_merge_and_gguf_of_a_tied_base_keep_the_trained_embedding_and_the_frozen_lm_head(tied_tiny_dir, corpus_dir,
                                                                                          tmp_path):
    """A tied base (one matrix for embed_tokens and lm_head, as SmolLM2): the adapter trained a copy of the
    embedding, so the merge is an untied model; saved with the base's tie flag, a reload would tie lm_head to the
    trained embedding."""
    from helpers import adapter_qa_rows, assert_tied_export_is_correct, export_adapter, split_rows, train_adapter

    assert json.loads((tied_tiny_dir / "config.json").read_text())["tie_word_embeddings"] is True
    train_rows, eval_rows = split_rows(adapter_qa_rows(corpus_dir), 16, 8)
    train_adapter(tied_tiny_dir, train_rows, eval_rows, tmp_path / "adapter", epochs=1.0, learning_rate=3e-3,
                  batch_size=4)
    metrics = export_adapter(tied_tiny_dir, tmp_path / "adapter", eval_rows, tmp_path / "export")
    assert_tied_export_is_correct(tied_tiny_dir, tmp_path / "adapter", tmp_path / "export", metrics)


def test_gguf_of_a_model_that_is_still_tied_has_no_output_weight_and_reads_back(tied_tiny_dir, tmp_path):
    """No trained embedding (e.g. `modules_to_save: []`): the merge stays tied, and llama.cpp's convention for that
    is a GGUF without output.weight (the loader ties it back)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrb.gguf_export import load_gguf, write_gguf

    model = AutoModelForCausalLM.from_pretrained(tied_tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tied_tiny_dir)
    write_gguf(tied_tiny_dir, tmp_path / "t.gguf", "f16")
    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "t.gguf").tensors}
    reread, _ = load_gguf(tmp_path / "t.gguf")
    assert reread.config.tie_word_embeddings
    ids = tok("What is a qubit and how is it measured?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = torch.log_softmax(model(ids).logits, -1), torch.log_softmax(reread(ids).logits, -1)
    assert (want.exp() * (want - got)).sum(-1).mean() < 1e-4, "f16 should barely move the next-token distribution"


def test_merged_export_serves_through_ask_and_the_wrong_folders_fail_in_one_line(exported, adapter_ws, monkeypatch,
                                                                                 tmp_path):
    import yaml

    from apps.bot import load_bot

    _, _, _, out, _ = exported
    monkeypatch.chdir(adapter_ws)
    bot = load_bot(out / "merged", max_new_tokens=8)
    assert not any("lora" in n for n, _ in bot.model.named_parameters())
    assert bot.generate([{"role": "user", "content": "What is a qubit?"}]).completion_tokens >= 1
    with pytest.raises(ConfigError, match="holds a GGUF: run it with Ollama or llama.cpp"):
        load_bot(out / "gguf")
    params = yaml.safe_load((adapter_ws / "params.yaml").read_text())
    params["base"]["model"] = str(out / "adapter")  # an adapter where the base model belongs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for kw in ({"base_only": True}, {}):
        with pytest.raises(ConfigError, match="is an adapter, not a model: set base.model to the base"):
            load_bot(params_path=tmp_path / "params.yaml", **kw)


EXPORT_PARAMS = {"merge_precision": "bf16", "gguf": "q8_0", "eval_batch_size": 8, "hub_repo_id": "someone/qrb",
                 "hub_token_env": "QRB_TEST_NO_SUCH_TOKEN", "hub_private": True}


def test_no_4bit_merge_no_loreft_merge_no_push_without_token(tmp_path, monkeypatch):
    from qrb.params import build
    from stages import export as ex

    base = {"model": "m", "system_prompt": "s", "hf_offline": False}
    with pytest.raises(ValueError, match=r"`export.merge_precision` must be one of 'bf16', 'fp16', 'fp32'"):
        build(ex.ExportParams, {**EXPORT_PARAMS, "merge_precision": "nf4"}, "export")
    with pytest.raises(ValueError, match=r"`export.gguf` must be one of 'q8_0', 'f16', 'none'"):
        build(ex.ExportParams, {**EXPORT_PARAMS, "gguf": "q4_k_m"}, "export")
    p = build(ex.ExportParams, EXPORT_PARAMS, "export")
    monkeypatch.delenv("QRB_TEST_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"\$QRB_TEST_NO_SUCH_TOKEN is not set"):
        ex.hub_token(base, p)
    assert ex.hub_token({**base, "hf_offline": True}, p) is None  # offline profile: never pushed, nothing to check
    monkeypatch.setenv("QRB_TEST_NO_SUCH_TOKEN", "hf_x")
    assert ex.hub_token(base, p) == "hf_x"
    (tmp_path / "loreft_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot be merged"):
        ex.load_base_and_adapter(base, p, tmp_path, "cpu")


def test_hub_repo_without_its_token_fails_in_one_line_before_any_work(adapter_ws, tmp_path, python):
    """`export.hub_repo_id` set and no token: exit 78 (config) with one line, before the merge is paid for."""
    import subprocess

    import yaml

    from helpers import REPO

    params = yaml.safe_load((adapter_ws / "params.yaml").read_text())
    params["base"]["hf_offline"] = False
    params["export"].update(hub_repo_id="someone/qrb", hub_token_env="QRB_TEST_NO_SUCH_TOKEN")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "QRB_TEST_NO_SUCH_TOKEN"}
    proc = subprocess.run([python, "-m", "stages.export"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("export: export.hub_repo_id is someone/qrb but "
                                                    "$QRB_TEST_NO_SUCH_TOKEN is not set: export a Hub write token in "
                                                    "it, or set export.hub_repo_id: null")
    assert not (tmp_path / "artifacts").exists()  # nothing merged, nothing written


def test_loreft_adapter_is_exported_as_is_with_the_reason_and_no_merge(tmp_path):
    """A LoReFT experiment must not fail the pipeline at export: the adapter is exported, merge/GGUF say why not."""
    from qrb.params import build
    from stages import export as ex

    adapter, card, out = tmp_path / "adapter", tmp_path / "card", tmp_path / "export"
    adapter.mkdir()
    card.mkdir()
    (adapter / "loreft_config.json").write_text("{}")
    (adapter / "loreft_weights.safetensors").write_bytes(b"x" * 100)
    (card / "README.md").write_text("# card\n")
    p = build(ex.ExportParams, {**EXPORT_PARAMS, "merge_precision": "fp32", "hub_repo_id": None}, "export")
    metrics = ex.export({"model": "m", "system_prompt": "s", "hf_offline": True, "max_length": 64}, p, [], "cpu",
                        adapter_dir=adapter, card_dir=card, out=out)
    assert metrics["skipped"] == ex.LOREFT_NOT_MERGEABLE and metrics["size_bytes"] == {"adapter": 100}
    assert (out / "adapter" / "loreft_config.json").exists() and (out / "adapter" / "README.md").exists()
    for d in ("merged", "gguf"):
        assert "cannot be merged" in (out / d / "NOT_EXPORTED.md").read_text()
