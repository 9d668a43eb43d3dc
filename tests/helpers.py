"""Helpers shared by test files (plain functions and constants; the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "You answer questions about quantum research."
ADAPTER_SYSTEM = "You are Quantum Research Bot. Answer questions about papers in the journal Quantum."


def recipe(**overrides):
    """The card's recipe from params.yaml, with `overrides`."""
    from qrb.params import load_params
    from stages.train import TrainParams

    _, p = load_params("train", TrainParams, (), REPO / "params.yaml")
    return dataclasses.replace(p, **overrides)


def cpu_recipe(**overrides):
    """The card's recipe with only what a CPU needs changed: fp32 (base_of sets a short max_length)."""
    return recipe(**{"precision": "fp32", "learning_rate": 3e-4, "logging_steps": 2, **overrides})


def abstract_sentences(corpus_dir: Path):
    """(paper record, its abstract's sentences longer than 20 characters) for every paper of the corpus."""
    for path in sorted(corpus_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            yield rec, [s for s in re.split(r"(?<=\.)\s+", rec["abstract"]) if len(s) > 20]


def qa_rows(corpus_dir: Path) -> list[dict]:
    return [{"question": f"What is point {i + 1} of the abstract of '{rec['title']}'?", "answer": s,
             "doi": rec["doi"] or rec["title"]}
            for rec, sentences in abstract_sentences(corpus_dir) for i, s in enumerate(sentences[:4])]


def base_of(tiny_model_dir) -> dict:
    return {"seed": 7, "model": str(tiny_model_dir), "system_prompt": SYSTEM, "hf_offline": True, "max_length": 192}


def adapter_qa_rows(corpus_dir: Path) -> list[dict]:
    return [{"question": f"What does the paper '{rec['title']}' say?", "answer": s,
             "doi": rec.get("doi") or rec["title"]}
            for rec, sentences in abstract_sentences(corpus_dir) for s in sentences[:2]]


def build_adapter_workspace(ws: Path, tiny_model_dir: Path, corpus_dir: Path) -> Path:
    """A trained tiny adapter in a workspace layout (deterministic; ~10 s on 2 CPU cores)."""
    from datasets import Dataset, DatasetDict

    from flows.workspace import profile_params
    from qrb.params import load_params
    from stages.train import BASE_KEYS, TrainParams
    from stages.train.run import save_adapter
    from stages.train.trainer import train

    params = profile_params("tiny", REPO, overrides={"base": {"model": str(tiny_model_dir), "system_prompt": ADAPTER_SYSTEM,
                                                                  "max_length": 160}})
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base, p = load_params("train", TrainParams, BASE_KEYS, ws / "params.yaml")
    extra = {"checkpoint_steps": 0} if "checkpoint_steps" in {f.name for f in dataclasses.fields(p)} else {}
    p = dataclasses.replace(p, epochs=2.0, learning_rate=3e-3, logging_steps=2, **extra)
    rows = adapter_qa_rows(corpus_dir)
    held_out = sorted({r["doi"] for r in rows})[:3]
    train_rows = [r for r in rows if r["doi"] not in held_out][:64]
    eval_rows = [r for r in rows if r["doi"] in held_out]
    ds = DatasetDict(train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows))
    model, tokenizer, metrics, history = train(base, p, ds, "cpu")
    save_adapter(model, tokenizer, p, ws / "artifacts" / "train" / "adapter")
    (ws / "artifacts" / "validate").mkdir(parents=True, exist_ok=True)
    (ws / "artifacts" / "validate" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    (ws / "history.json").write_text(json.dumps(history, default=str))
    return ws


def split_rows(rows: list[dict], n_train: int, n_eval: int, held_out_papers: int = 3) -> tuple[list[dict], list[dict]]:
    held_out = sorted({r["doi"] for r in rows})[:held_out_papers]
    return ([r for r in rows if r["doi"] not in held_out][:n_train], [r for r in rows if r["doi"] in held_out][:n_eval])


def train_adapter(model_dir: Path, train_rows: list[dict], eval_rows: list[dict], out: Path, *, max_length: int = 192,
                  **overrides):
    """cpu_recipe(**overrides) trained on the rows through the stage's core, saved to `out` as the stage saves it.
    Returns (model, tokenizer, metrics)."""
    from datasets import Dataset, DatasetDict

    from stages.train.run import save_adapter
    from stages.train.trainer import train

    p = cpu_recipe(**{"checkpoint_steps": 0, "emissions_country": None, **overrides})
    ds = DatasetDict(train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows))
    model, tokenizer, metrics, _ = train({**base_of(model_dir), "max_length": max_length}, p, ds, "cpu")
    save_adapter(model, tokenizer, p, out)
    return model, tokenizer, metrics


def export_adapter(model_dir: Path, adapter_dir: Path, rows: list[dict], out: Path, *, max_length: int = 192) -> dict:
    """The export stage's core (fp32 merge + Q8_0 GGUF) on an adapter; returns its metrics."""
    from qrb.params import build
    from stages import export as ex

    card = out / "card"
    card.mkdir(parents=True, exist_ok=True)
    (card / "README.md").write_text("# card\n")
    p = build(ex.ExportParams, {"merge_precision": "fp32", "gguf": "q8_0", "eval_batch_size": 4,
                                "hub_repo_id": None, "hub_token_env": "HF_TOKEN", "hub_private": True}, "export")
    return ex.export({**base_of(model_dir), "max_length": max_length}, p, rows, "cpu", adapter_dir=adapter_dir,
                     card_dir=card, out=out)


def assert_embedding_trained_and_the_rest_frozen(model, model_dir: Path, tokenizer) -> None:
    """The PEFT model of the recipe after training: its copy of the input embedding moved; lm_head (tied or not)
    and every base weight are still the base's (resized for the added pad token, as train rebuilt it)."""
    import torch

    from qrb.model import load_causal_lm, resize_for_tokenizer

    original = load_causal_lm(str(model_dir))
    resize_for_tokenizer(original, tokenizer)
    params = dict(model.named_parameters())
    copy = params["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert not torch.allclose(copy, original.get_input_embeddings().weight), "the embedding copy must train"
    head = model.get_output_embeddings().weight
    assert not head.requires_grad and torch.equal(head, original.get_output_embeddings().weight), "lm_head moved"
    checked = 0
    for name, before in original.state_dict().items():
        if name == "model.embed_tokens.weight":
            after = params["base_model.model.model.embed_tokens.original_module.weight"]
        else:
            module, leaf = name.rsplit(".", 1)
            after = params.get(f"base_model.model.{module}.base_layer.{leaf}", params.get(f"base_model.model.{name}"))
            if after is None and name == "lm_head.weight":
                after = head  # tied: the model lists one matrix under the embedding's name
        assert torch.equal(after.detach(), before), f"base weight {name} changed"
        checked += 1
    assert checked == len(original.state_dict())


def assert_tied_export_is_correct(model_dir: Path, adapter_dir: Path, out: Path, metrics: dict) -> None:
    """Merge of an adapter that trained the embedding of a tied base: an untied model carrying both matrices (the
    trained embedding, the base's lm_head) whose reloaded logits are the adapter's; the GGUF keeps them apart too."""
    import json

    import torch
    from safetensors.torch import load_file

    from qrb.gguf_export import load_gguf
    from qrb.model import load_causal_lm, load_with_adapter

    assert json.loads((out / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    state: dict = {}
    for f in sorted((out / "merged").glob("*.safetensors")):
        state.update(load_file(str(f)))
    emb, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    ref, tok = load_with_adapter(str(model_dir), adapter_dir)
    ref.eval()
    with ref.disable_adapter():
        base_head = ref.get_output_embeddings().weight.detach().clone()
    assert torch.equal(head, base_head), "the merged lm_head must be the base's (frozen)"
    assert torch.equal(emb, ref.get_input_embeddings().modules_to_save["default"].weight.detach())
    assert not torch.equal(emb, head)
    merged = load_causal_lm(str(out / "merged"))
    assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    gguf, _ = load_gguf(out / "gguf" / metrics["gguf_file"])
    assert not gguf.config.tie_word_embeddings  # output.weight written: the frozen lm_head beside the trained embedding
    ids = tok("What is a qubit and how is it measured?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.allclose(merged(ids).logits, want, atol=1e-4), "reloaded merge != adapter"
        with ref.disable_adapter():  # the adapter changed the model: the comparison means something
            assert not torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-3)
        step = head.abs().amax(dim=1, keepdim=True) / 127  # Q8_0: at most half a step of its 32-value block's scale
        assert torch.all((gguf.get_output_embeddings().weight - head).abs() <= step), "GGUF lm_head is not the base's"
        assert torch.all((gguf.get_input_embeddings().weight - emb).abs() <= emb.abs().amax(dim=1, keepdim=True) / 127)
    assert abs(metrics["merge_ce_delta"]) < 1e-4
    assert abs(metrics["gguf_ce_delta"]) < 0.02 and metrics["eval_ce"]["gguf"] > 0


def assert_answer_only_loss_is_exact(model_dir: Path, rows: list[dict], run_dir: Path, **overrides) -> None:
    """What the stage's trainer feeds the model: each sequence is the generation prompt (the model's own chat
    template) followed by the answer and the end-of-turn token, and only those carry labels; pad is not eos."""
    from datasets import Dataset, DatasetDict

    from qrb.model import load_tokenizer, prompt_messages
    from stages.train.trainer import build_model, build_trainer, prepare_tokenizer

    base, p = base_of(model_dir), cpu_recipe(**overrides)
    tokenizer, added = prepare_tokenizer(load_tokenizer(str(model_dir)), p)
    assert added == 1 and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = build_model(base, p, tokenizer, "cpu")
    trainer = build_trainer(base, p, model, tokenizer, DatasetDict(train=Dataset.from_list(rows)), run_dir)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for i, r in enumerate(rows):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        n = int(batch["attention_mask"][i].sum())
        prompt = tokenizer.apply_chat_template(prompt_messages(base["system_prompt"], r["question"]), tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[:len(p_ids)] == p_ids, "the generation prompt must be a prefix of the training sequence"
        assert ids[len(p_ids):n] == answer, "after the prompt: the answer and the end-of-turn token, nothing more"
        assert labels[:len(p_ids)] == [-100] * len(p_ids) and labels[len(p_ids):n] == answer
        assert labels[n:] == [-100] * (len(ids) - n) and ids[n:] == [tokenizer.pad_token_id] * (len(ids) - n)


def legacy_train_path():
    """The train stage's trainer as it ran before its CPU speed work: trl's own loss (its fused LM head scores every
    position on a CPU), the per-parameter AdamW (not fused) and torch's dropout. A context manager, for equivalence
    tests and bench."""
    import contextlib
    from unittest import mock

    import torch
    from peft.optimizers import create_loraplus_optimizer
    from trl import SFTTrainer

    from stages.train import hooks
    from stages.train import trainer as tr

    class Legacy(hooks.counting_trainer_cls()):
        compute_loss = SFTTrainer.compute_loss

    def unfused(model, p):
        return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=p.learning_rate,
                                         loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay)

    stack = contextlib.ExitStack()  # lora_plus hands its optimizer to the trainer: SFTConfig's `optim` is unused
    stack.enter_context(mock.patch.object(hooks, "counting_trainer_cls", lambda: Legacy))
    stack.enter_context(mock.patch.object(tr, "build_optimizer", unfused))
    stack.enter_context(mock.patch.object(hooks, "word_dropout_", lambda model: None))
    return stack


CHROMIUM_APT = "apt-get update && apt-get install -y chromium chromium-driver"


def browser_missing(reason: str) -> None:
    """A browser test without its browser skips, except in CI (CI=true: .ci/run installs it), where it fails."""
    import os


    (pytest.fail if os.environ.get("CI", "").lower() in ("true", "1") else pytest.skip)(reason)


def headless_chromium(offline: bool = True):
    """A headless Chromium driven by selenium (skips when either is missing, fails in CI), with the browser's console log kept
    (`driver.get_log("browser")`); offline: every host name fails to resolve, so a page that needs the network
    shows it."""
    import contextlib
    import shutil
    import tempfile


    @contextlib.contextmanager
    def run():
        browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                       None)
        driver_path = shutil.which("chromedriver")
        if not browser or not driver_path:
            browser_missing(f"chromium/chromedriver not installed: add `{CHROMIUM_APT}` to .ci/run")
        if importlib.util.find_spec("selenium") is None:
            browser_missing("selenium is not installed: pip install selenium (dev dependency)")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        with tempfile.TemporaryDirectory(prefix="qrb-chromium-") as profile:
            opts = webdriver.ChromeOptions()
            opts.binary_location = browser
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                         *(["--host-resolver-rules=MAP * ~NOTFOUND"] if offline else [])):
                opts.add_argument(flag)
            opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
            driver = webdriver.Chrome(service=Service(driver_path), options=opts)
            try:
                yield driver
            finally:
                driver.quit()

    return run()


def set_args(nested: dict, prefix: str = "") -> list[str]:
    """-S arguments for nested overrides (values as JSON, which YAML reads), as a user passes them to `qrb demo`."""
    args = []
    for key, value in nested.items():
        if isinstance(value, dict):
            args += set_args(value, f"{prefix}{key}.")
        else:
            args += ["-S", f"{prefix}{key}={json.dumps(value)}"]
    return args


# ---- a served app and a headless browser (test_serve, test_rag) ----------------------------------------------------
CHROMIUM_APT = "apt-get update && apt-get install -y chromium chromium-driver"


@contextlib.contextmanager
def running(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium():
    found = _chromium()
    if found is None:
        browser_missing(f"chromium/chromedriver not installed: add `{CHROMIUM_APT}` to .ci/run")
    if importlib.util.find_spec("selenium") is None:
        browser_missing("selenium is not installed: pip install selenium (dev dependency)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    with tempfile.TemporaryDirectory(prefix="qrb-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def ask_page(driver, question: str):
    """Type a question, send it, and return the bubble it ends in (an answer or an error)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error"))
    driver.find_element(By.ID, "input").send_keys(question)
    driver.find_element(By.ID, "send").click()
    done = WebDriverWait(driver, 120).until(
        lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")[before:]
                   if e.get_attribute("data-done") == "true"])
    return done[0]


def validate_workspace(root: Path, validate: dict, papers: list, train: list, eval_: list, seen: list | None) -> Path:
    """A folder the validate stage runs in: params (`validate:` as given), the papers and generate's outputs (seen
    and invented written unless `seen` is None, as an older generate would have left them)."""
    import yaml

    from qrb.io import write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((repo / "params.yaml").read_text())["base"]
    (root / "params.yaml").write_text(yaml.safe_dump({"base": base, "validate": validate}))
    write_jsonl(root / "artifacts/scrape/papers.jsonl", papers)
    for name, rows in (("train", train), ("eval", eval_)) + ((("seen", seen), ("invented", [])) if seen is not None
                                                              else ()):
        write_jsonl(root / f"artifacts/generate/{name}.jsonl", list(rows))
    return root


def run_validate(ws: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.validate"], cwd=ws, capture_output=True, text=True,
                          timeout=120)


def bot_in(ws: Path, **kwargs):
    """`apps.bot.load_bot(**kwargs)` run from `ws`: the workspace's params.yaml and artifacts/ are read from cwd,
    as the CLI does."""
    import os

    from apps.bot import load_bot

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        return load_bot(**kwargs)
    finally:
        os.chdir(cwd)


def smol_recipe(**train_overrides):
    """(base, TrainParams) of the smol profile on the shared SmolLM2 build, for benches timing the train stage."""
    from flows.workspace import profile_params
    from qrb.params import build
    from stages.train import TrainParams
    from standins import smol_model

    repo = Path(__file__).resolve().parent.parent
    params = profile_params("smol", repo)
    model_dir = smol_model.build(Path.home() / ".cache" / "qrb-tests" / "smollm2-135m-instruct")
    base = {**{k: params["base"][k] for k in ("seed", "system_prompt", "hf_offline", "max_length")},
            "model": str(model_dir)}
    return base, dataclasses.replace(build(TrainParams, params["train"], "train"), **train_overrides)

