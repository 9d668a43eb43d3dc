"""The validated pairs as OpenAI chat fine-tuning JSON Lines: other trainers read them as they are, and the export
stage pushes them to the Hub as a dataset repo beside the adapter."""

from __future__ import annotations

import base64
import gzip
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers import SYSTEM, qa_rows
from stages.validate.run import write_openai


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


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub API routes `create_repo` + `upload_folder` of small files use, on 127.0.0.1; records each call."""

    calls: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.calls.append((self.path, body.decode()))
        url = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            out = {"url": f"{url}/{json.loads(body)['organization']}/{json.loads(body)['name']}"}
        elif "/preupload/" in self.path:  # small files go inline in the commit
            out = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(body)["files"]]}
        else:  # /api/<kind>s/<repo>/commit/main
            repo = self.path.split("/commit/")[0].removeprefix("/api").replace("/models/", "/")
            out = {"commitUrl": f"{url}{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_hub_push_sends_the_adapter_and_the_openai_jsonl_as_a_dataset_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from qrb.params import build
    from stages import export as ex

    adapter, data = tmp_path / "adapter", tmp_path / "openai"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_openai(data, {"train": [{"question": "Q?", "answer": "A."}], "eval": []}, SYSTEM)
    p = build(ex.ExportParams, {"merge_precision": "fp32", "gguf": "none", "eval_batch_size": 8,
                                "hub_repo_id": "someone/qrb", "hub_token_env": "HF_TOKEN", "hub_private": True}, "export")
    FakeHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' default: no hub at all
    try:
        assert ex.push_to_hub(p, "hf_x", adapter, data) == "someone/qrb"
    finally:
        server.shutdown()
    creates = [json.loads(body) for path, body in FakeHub.calls if path == "/api/repos/create"]
    assert [(c["name"], c.get("type", "model"), c["visibility"]) for c in creates] == [
        ("qrb", "model", "private"), ("qrb", "dataset", "private")]
    commits = {path: body for path, body in FakeHub.calls if "/commit/" in path}
    assert set(commits) == {"/api/models/someone/qrb/commit/main", "/api/datasets/someone/qrb/commit/main"}
    sent = [json.loads(line)["value"] for line in commits["/api/datasets/someone/qrb/commit/main"].splitlines()]
    files = {v["path"]: base64.b64decode(v["content"]).decode() for v in sent if "content" in v}
    assert set(files) == {"train.jsonl", "eval.jsonl"}
    assert json.loads(files["train.jsonl"])["messages"][2] == {"role": "assistant", "content": "A."}
