"""Helpers shared by the generate tests (tests/test_generate*.py): fake papers, a workspace for a stage run, the
flagship params with overrides, and a scripted stand-in for the openai client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import yaml

from qrb.params import build, deep_merge
from stages.generate import GenerateParams
from stages.generate.run import load_templates, main
from stages.generate.units import build_units
from standins.smoke import MODEL_ID

ROOT = Path(__file__).resolve().parents[1]
MARKER = "sk-MARKER-7c1d9e0f-never-write-me"
KEY_ENV = "QRB_TEST_GENERATE_KEY"

TOPICS = ["photonic boson sampling", "trapped-ion clock", "surface code decoder", "tensor network contraction",
          "variational eigensolver", "quantum key distribution", "Hamiltonian learning", "magic state distillation",
          "spin chain transport", "superconducting transmon", "quantum walk search", "Rydberg atom array",
          "Gaussian state tomography", "fermionic simulation", "entanglement witness", "quantum metrology probe",
          "cat qubit stabilization", "measurement-based computation", "quantum signal processing",
          "open system dynamics", "circuit knitting", "shadow tomography", "holonomic gate", "topological phase"]


def fake_papers() -> list[dict]:
    papers = []
    for i, topic in enumerate(TOPICS):
        other = TOPICS[(i * 7 + 3) % len(TOPICS)]
        abstract = (f"The {topic} is a central primitive of quantum technologies. "
                    f"We develop a {topic} protocol based on {other} techniques with {i + 2} ancilla modes. "
                    f"Our numerical simulations show a fidelity of {90 + i % 9}.{i}% for the {topic}. "
                    f"Compared with previous {other} proposals, the {topic} scheme reduces the overhead by a factor "
                    f"of {i + 3}. The {topic} threshold is defined as the largest tolerable noise strength.")
        papers.append({"doi": f"10.22331/q-2024-{(i % 12) + 1:02d}-{(i % 27) + 1:02d}-{1400 + i}",
                       "url": f"https://quantum-journal.org/papers/q-{i}/", "title": f"A study of {topic} via {other}",
                       "authors": ["A. Author"], "affiliations": [], "published": f"2024-{(i % 12) + 1:02d}-01",
                       "volume": "8", "page": str(1400 + i), "arxiv": None, "citation": None,
                       "abstract": abstract, "license": "CC-BY-4.0"})
    return sorted(papers, key=lambda r: r["doi"])


def make_workspace(path: Path, base_url: str, papers: list[dict] | None = None, **overrides) -> Path:
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text()))
    params["generate"].update({"base_url": base_url, "model": MODEL_ID, "api_key_env": KEY_ENV, "eval_size": 30,
                               "timeout_s": 0.5, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "concurrency": 8,
                               "max_retries": 4, "price_input_per_1m": 10.0, "price_output_per_1m": 30.0,
                               "max_cost_usd": 5.0, **MACHINERY, **overrides})
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "prompts", path / "prompts", dirs_exist_ok=True)
    (path / "artifacts/scrape").mkdir(parents=True, exist_ok=True)
    rows = papers if papers is not None else fake_papers()
    (path / "artifacts/scrape/papers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def outputs(ws: Path) -> dict[str, bytes]:
    return {name: (ws / "artifacts/generate" / name).read_bytes()
            for name in ("train.jsonl", "eval.jsonl", "seen.jsonl", "failures.jsonl")}


def run_main(ws: Path, monkeypatch, *args: str) -> None:
    monkeypatch.chdir(ws)
    monkeypatch.setenv(KEY_ENV, MARKER)
    main(list(args))


def params_of(ws: Path) -> GenerateParams:
    return build(GenerateParams, yaml.safe_load((ws / "params.yaml").read_text())["generate"], "generate")


# the request machinery's tests count requests of this fixed shape (5 focus templates x 3 pairs), not the recipe's
MACHINERY = {"prompts": ["factual", "results", "methods", "novelty", "definitions"], "pairs_per_prompt": 3,
             "abstain_share": 0.0, "invented_questions": 0}


def recipe(**overrides) -> GenerateParams:
    """The flagship generate params (params.yaml) in the machinery tests' shape, with overrides."""
    return build(GenerateParams, {**yaml.safe_load((ROOT / "params.yaml").read_text())["generate"], **MACHINERY,
                                  **overrides}, "generate")


GOOD = '{"pairs": [{"question": "What is A?", "answer": "A is a."}]}'


class ScriptedClient:
    """Stands in for an AsyncOpenAI client: `chat.completions.create` plays a script (a reply or an exception per
    call) and records each call's arguments."""

    def __init__(self, *script) -> None:
        self.script, self.calls = list(script), []
        self.chat = SimpleNamespace(completions=self)

    async def create(self, **kwargs):
        self.calls.append(kwargs)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def reply(content: str, finish: str = "stop") -> SimpleNamespace:
    return SimpleNamespace(id="chatcmpl-1", model=MODEL_ID, usage=SimpleNamespace(prompt_tokens=7, completion_tokens=3),
                           choices=[SimpleNamespace(message=SimpleNamespace(content=content), finish_reason=finish)])


def one_unit(p: GenerateParams):
    system, templates = load_templates(p.prompts, ROOT / "prompts")
    return build_units(fake_papers()[:1], templates, system, p, 1)[0]




def record(ws: Path) -> dict:
    """The stage's whole metrics record (reports/generate.json where the stage splits out its headline numbers)."""
    for rel in ("reports/generate.json", "metrics/generate.json"):
        if (ws / rel).exists():
            return json.loads((ws / rel).read_text())
    raise FileNotFoundError(f"no generate metrics in {ws}")
