"""The model behind `qrb ask`, `qrb chat` and `qrb serve`, the `serve:` params they share (limits, defaults) and their
command line and error path.

The model is base.model + the adapter (artifacts/train/adapter) loaded exactly as evaluate loads it (the adapter's
tokenizer and chat template, `base.system_prompt`), an exported model folder, or with `--base` base.model alone with
the same template and system prompt: the model evaluate scores as "base" (docs/using.md). Errors are `qrb.errors`
exceptions; `run_app` turns them into one line `qrb <cmd>: <message>` and the kind's exit code, as stages do.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError, QrbError
from qrb.model import Gate
from qrb.params import Base, load_params
from qrb.retrieval import ground, open_index
from qrb.schema import ABSTAIN_ANSWER
from qrb.sources import sourced
from qrb.stage import fail, set_cpu_threads, set_hf_offline

log = logging.getLogger(__name__)

SECTION = "serve"
DEFAULT_ADAPTER = Path("artifacts/train/adapter")


@dataclass(frozen=True)
class ServeParams:
    """The `serve:` section: how `qrb ask`, `qrb chat` and `qrb serve` run the model."""

    host: str  # 127.0.0.1: local only
    port: int
    model_id: str  # the name /v1/models reports and clients pass as `model`
    max_input_tokens: int  # longer prompts are refused (serve) or lose their oldest turns (chat)
    max_new_tokens: int  # the default and the cap for a reply's length
    max_request_bytes: int  # serve: larger request bodies are refused with 413
    temperature: float  # default; 0 = greedy (as evaluate)
    rag: bool  # answer from the papers retrieved from artifacts/index (`retrieval:`) and cite them (--rag)

    def check(self) -> None:
        for key in ("max_input_tokens", "max_new_tokens", "max_request_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"params: `serve.{key}` must be a positive integer")
        if not 0 <= self.port < 65536:
            raise ValueError("params: `serve.port` must be in 0..65535")
        if self.temperature < 0:
            raise ValueError("params: `serve.temperature` must be >= 0")


class InputTooLong(DataError, ValueError):
    """The rendered prompt has more tokens than `serve.max_input_tokens` (bad input: exit 65, HTTP 400)."""


@dataclass
class Reply:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_new_tokens cut it short


@dataclass
class Bot:
    """A loaded model + tokenizer + the training system prompt; generation is serialised by a lock."""

    model: Any
    tokenizer: Any
    system_prompt: str
    limits: ServeParams
    source: str = ""
    base_only: bool = False  # base.model without the adapter (`--base`)
    retriever: Any = None  # with serve.rag: a qrb.retrieval.Retriever over the index; `retrieval:` params below
    retrieval: Any = None
    gate: Gate | None = None  # the adapter's confidence gate (qrb.model.read_gate): closed-book replies only
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ground(self, conversation: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list | None]:
        """With rag: the last question carries the passages retrieved for it, plus those passages (what
        `qrb.retrieval.cite` maps the answer's [n] to; None: nothing relevant was retrieved, abstain). Without: the
        conversation as it is, no passages."""
        if self.retriever is None:
            return list(conversation), []
        prompt, shown = ground(self.retriever, self.retrieval, [conversation[-1]["content"]])[0]
        return [*conversation[:-1], {"role": "user", "content": prompt or ""}], shown or None

    # ---- special tokens -----------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> set[int]:
        """End of turn: the generation config's eos ids (Llama-3 has several) and the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}

    @property
    def pad_token_id(self) -> int | None:
        """The id generate() is told to pad with. An adapter's tokenizer has its own pad token; a base's may have
        none (the tiny Llama) or pad with eos (SmolLM2): then eos, which is harmless for one unpadded sequence
        and keeps generate() from guessing one per request."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return min(self.eos_token_ids, default=None)

    # ---- prompt -------------------------------------------------------------------------------------------
    def messages(self, conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """The training layout: the system prompt first (a conversation's own system message replaces it)."""
        conv = [{"role": m["role"], "content": m["content"]} for m in conversation]
        if not conv or conv[0]["role"] != "system":
            conv = [{"role": "system", "content": self.system_prompt}, *conv]
        return conv

    def prompt_ids(self, conversation: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(conversation), tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.limits.max_input_tokens:
            raise InputTooLong(f"the prompt has {len(ids)} tokens; the limit (serve.max_input_tokens) is "
                               f"{self.limits.max_input_tokens}")
        return ids

    def fit_history(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        """Drop the oldest question/answer turns until the prompt fits (the last question always stays)."""
        history = list(history)
        while True:
            try:
                self.prompt_ids(history)
                return history
            except InputTooLong:
                if len(history) <= 1:
                    raise
                history = history[2:] if len(history) > 2 else history[-1:]

    # ---- generation ---------------------------------------------------------------------------------------
    def _gen_kwargs(self, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
                    seed: int | None) -> dict[str, Any]:
        n = self.limits.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= n <= self.limits.max_new_tokens:
            raise ValueError(f"max_tokens must be between 1 and {self.limits.max_new_tokens} "
                             "(serve.max_new_tokens)")
        t = self.limits.temperature if temperature is None else temperature
        kw: dict[str, Any] = {"max_new_tokens": n, "pad_token_id": self.pad_token_id}
        if t > 0:
            kw.update(do_sample=True, temperature=t, top_p=1.0 if top_p is None else top_p)
            if seed is not None:
                import torch

                torch.manual_seed(seed)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _finish(self, reply: Reply, new_ids: list[int], max_new: int) -> None:
        eos = self.eos_token_ids
        reply.completion_tokens = len(new_ids)
        reply.finish_reason = "length" if len(new_ids) >= max_new and (not new_ids or new_ids[-1] not in eos) \
            else "stop"

    def generate(self, conversation: Sequence[dict[str, str]], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 gated: bool | None = None) -> Reply:
        """The reply to `conversation`; `gated`: through the adapter's confidence gate (default: `self.gated`)."""
        import torch

        ids = self.prompt_ids(conversation)
        kw = self._gen_kwargs(max_new_tokens, temperature, top_p, seed)
        device = next(self.model.parameters()).device
        gated = self.gated if gated is None else gated
        with self.lock, torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                                      output_logits=gated, return_dict_in_generate=True, **kw)
        new = out.sequences[0, len(ids):].tolist()
        reply = Reply(text=self.tokenizer.decode(new, skip_special_tokens=True).strip(), prompt_tokens=len(ids))
        if gated:
            from qrb.model import token_confidence

            stops = self.eos_token_ids | {self.pad_token_id} - {None}
            question = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
            reply.text = self.gate(question, reply.text,
                                   token_confidence(out.logits, out.sequences[:, len(ids):], stops)[0])
        self._finish(reply, new, kw["max_new_tokens"])
        return reply

    def respond(self, plain: Sequence[dict[str, str]], grounded: Sequence[dict[str, str]], shown: Sequence | None,
                *, stream: bool = True, **kw: Any) -> tuple[Reply, Generator[str, None, None]]:
        """What the apps answer, and its text in pieces. Without rag: the reply to `grounded` (`plain` as it is),
        streamed. With rag (`qrb.sources.sourced`): the reply over the passages (`shown`; None: nothing relevant was
        retrieved) where an excerpt it cites states it; else, from an adapter with a gate, its closed-book reply
        through the gate; else the abstention. It is checked whole, so it comes as one piece."""
        if self.retriever is None:
            if stream:
                return self.stream(grounded, **kw)
            reply = self.generate(grounded, **kw)
            return reply, (t for t in [reply.text])
        replies = [self.generate(grounded, **kw) if shown is not None else Reply(text=ABSTAIN_ANSWER)]

        def recall() -> str:  # the closed-book reply through the gate, whose usage the answer then reports
            replies.append(self.generate(plain, gated=True, **kw))
            return replies[-1].text

        text = sourced(replies[0].text if shown is not None else None, recall if self.gate is not None else None,
                       shown or [])
        reply = replies[-1]
        reply.text = text
        return reply, (t for t in [reply.text])

    @property
    def gated(self) -> bool:
        """Replies pass the confidence gate: an adapter that has one, answering closed-book (with rag the passages
        and `retrieval.min_score` decide)."""
        return self.gate is not None and self.retriever is None

    def stream(self, conversation: Sequence[dict[str, str]], *, max_new_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None) -> tuple[Reply, Generator[str, None, None]]:
        """Validate now (errors raise before any output), then yield text pieces as they are generated; the Reply is
        complete once the iterator is exhausted, and closing the iterator early stops generation."""
        if self.gated:  # a gated reply is known only once whole: one piece
            reply = self.generate(conversation, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed)
            return reply, (t for t in [reply.text] if t)
        ids = self.prompt_ids(conversation)
        kw = self._gen_kwargs(max_new_tokens, temperature, top_p, seed)
        reply = Reply(prompt_tokens=len(ids))
        return reply, self._stream(ids, kw, reply)

    def _stream(self, ids: list[int], kw: dict[str, Any], reply: Reply) -> Generator[str, None, None]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stop = threading.Event()
        device = next(self.model.parameters()).device
        result: dict[str, Any] = {}

        def stopped(input_ids, scores, **kwargs) -> Any:  # a StoppingCriteria: set when a client went away
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                with torch.no_grad():
                    result["out"] = self.model.generate(
                        input_ids=torch.tensor([ids], device=device),
                        attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([stopped]), **kw)
            except BaseException as e:  # surfaced to the consumer below
                result["error"] = e
                streamer.end()

        self.lock.acquire()
        thread = threading.Thread(target=work, name="qrb-generate", daemon=True)
        try:
            thread.start()
            first = True
            for piece in streamer:
                if first:  # the answer is stripped like generate()'s
                    piece = piece.lstrip()
                    first = not piece
                if piece:
                    reply.text += piece
                    yield piece
            thread.join()
            if "error" in result:
                raise result["error"]
            new = result["out"][0, len(ids):].tolist()
            reply.text = reply.text.rstrip()
            self._finish(reply, new, kw["max_new_tokens"])
        finally:
            stop.set()
            thread.join(timeout=600)
            self.lock.release()


def load_serve_params(path: str | Path = "params.yaml") -> tuple[Base, ServeParams]:
    """`base:` and `serve:` of a params file; a missing or bad file is a ConfigError."""
    try:
        base, p = load_params(SECTION, ServeParams, [f.name for f in dataclasses.fields(Base)], path)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from a workspace (or repo) root, or pass --params") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Base(**base), p


def load_bot(model_path: str | Path | None = None, params_path: str | Path = "params.yaml",
             device: str | None = None, base_only: bool = False, **overrides: Any) -> Bot:
    """Base + adapter (the default), a folder holding an adapter, an exported (merged) model folder, or with
    `base_only` base.model alone (its own tokenizer, no adapter); `overrides` replace `serve:` values. Raises
    ConfigError when something is missing."""
    base, limits = load_serve_params(params_path)
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    try:
        limits.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if base_only and model_path is not None:
        raise ConfigError("--base is base.model alone: it takes no --model")
    set_hf_offline(base.hf_offline)
    set_cpu_threads()
    retriever, retrieval = open_index(params_path) if limits.rag else (None, None)  # before the model: fail fast
    import torch

    from qrb.model import adapter_kind, load_causal_lm, load_tokenizer, load_with_adapter, read_gate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    path = Path(model_path) if model_path else DEFAULT_ADAPTER
    if adapter_kind(base.model):  # transformers would fail deep inside, looking for weights an adapter lacks
        raise ConfigError(f"base.model {base.model} is an adapter, not a model: set base.model to the base it was "
                          "trained on (its adapter_config.json says which) and pass the adapter as --model")
    if base_only:  # the chat template is the base tokenizer's own: the one train rendered every pair with
        tokenizer = load_tokenizer(base.model)
        model = load_causal_lm(base.model, dtype=dtype)
        source = f"base model {base.model}, no adapter"
    elif adapter_kind(path):  # a PEFT or LoReFT adapter on base.model
        model, tokenizer = load_with_adapter(base.model, path, dtype=dtype)
        source = f"{path} on {base.model}"
    elif (path / "config.json").exists():  # the merged export, or any transformers model folder
        model, tokenizer = load_causal_lm(str(path), dtype=dtype), load_tokenizer(str(path))
        source = str(path)
    elif any(path.glob("*.gguf")):
        raise ConfigError(f"{path} holds a GGUF: run it with Ollama or llama.cpp (docs/serving.md); qrb serves the "
                          "merged export (artifacts/export/merged) or an adapter")
    elif model_path is None:
        raise ConfigError(f"no adapter in {path}: run the pipeline first (dvc repro train), from the "
                          "workspace root, or pass --model (or --base for the base model alone)")
    else:
        raise ConfigError(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    gate = None if base_only else read_gate(path)  # an adapter's confidence gate; the export copies it
    model = model.to(device)
    model.eval()
    return Bot(model=model, tokenizer=tokenizer, system_prompt=base.system_prompt, limits=limits, source=source,
               base_only=base_only, retriever=retriever, retrieval=retrieval, gate=gate)


# ---- the apps' command line --------------------------------------------------------------------------------------

def bounded(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: `cast(text)` where `ok` holds it, else a usage error saying what was expected."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # nan fails `x >= 0`: refused like any other non-number
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = bounded(int, lambda n: n >= 1, "a positive integer")
non_negative_float = bounded(float, lambda x: x >= 0, "a number >= 0")


def app_parser(cmd: str, doc: str | None) -> argparse.ArgumentParser:
    """`qrb <cmd>`'s parser: its module docstring as --help (first paragraph = description)."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    return argparse.ArgumentParser(prog=f"qrb {cmd}", description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, metavar="DIR",
                       help=f"adapter or merged model folder, e.g. artifacts/export/merged or artifacts/export/adapter "
                            f"(default {DEFAULT_ADAPTER} on base.model)")
    which.add_argument("--base", action="store_true",
                       help="the base model alone (base.model, no adapter) with the same chat template and system "
                            "prompt: to compare with the fine-tuned answers")
    ap.add_argument("--params", default="params.yaml", metavar="FILE",
                    help="params file (base.model, base.system_prompt, serve:); default %(default)s")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                    help="longest reply, in tokens (default serve.max_new_tokens; serve refuses a max_tokens above it)")
    ap.add_argument("--temperature", type=non_negative_float, default=None, metavar="T",
                    help="sampling temperature; 0 = greedy, as evaluate (default serve.temperature)")
    ap.add_argument("--rag", action="store_const", const=True, default=None,
                    help="answer from the papers retrieved from artifacts/index (the `retrieval:` params) and name "
                         "them (title, DOI link); abstain when none is relevant (default serve.rag)")


def quiet_libraries() -> None:
    """A terminal chat shows the answer, not loading bars and library deprecation notes."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The recipe trains a copy of a tied input embedding on purpose (lm_head stays frozen: merge unties them);
    # peft warns about it on every load of such an adapter.
    warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True` and a tied layer",
                            category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def bot_from_args(args: argparse.Namespace) -> Bot:
    quiet_libraries()
    return load_bot(args.model, args.params, base_only=args.base, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, rag=args.rag)


def run_app(prog: str, body: Callable[[], None]) -> None:
    """The apps' one error path, the stages' own (`qrb.stage.fail`): a QrbError or ValueError becomes one line
    `<prog>: <message>` and its kind's exit code; Ctrl-C ends quietly (130)."""
    try:
        body()
    except (QrbError, ValueError) as e:
        fail(prog, e)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)
