"""Smoke-test stand-in for an OpenAI-compatible chat-completions endpoint (NOT a language model).

Run it:  `python -m qrb.offline.smoke_endpoint --port 8732`  (serves on 127.0.0.1 until killed; the offline profile
`profiles/tiny.yaml` points `generate.base_url` at http://127.0.0.1:8732/v1, any API key is accepted).
In tests:

    with serve_smoke_endpoint(port=0, faults=Faults(rate_429=0.3, seed=1)) as ep:
        client = AsyncOpenAI(base_url=ep.base_url, api_key="x")
        ...
        ep.request_count, ep.requests   # what the server has seen

It speaks the chat-completions wire format the openai SDK parses (`POST /v1/chat/completions`, `GET /v1/models`),
and writes question/answer pairs *deterministically and extractively* from the paper that the generate stage
delimits in the user message (`<paper> ... </paper>` with `Title:` and `Abstract:` lines): the answers are
sentences of the abstract, the questions name the paper's title and a phrase of the answer sentence, and their
wording depends on the prompt's `Question focus:` line. Every reply is labelled: model id `qrb-smoke-extractive`
and a `system_fingerprint` saying that it is a smoke-test endpoint.

`response_format` with a JSON schema is honoured (the content is JSON matching the schema); without it the JSON
comes inside a Markdown code fence after a line of prose, as some endpoints do, to exercise tolerant parsers.

Faults and latency are injectable (`Faults`): rates of 429 (with Retry-After), 500, stalls (the reply comes after
`stall_s`, past a client's timeout), invalid JSON content and truncated replies (`finish_reason: "length"`). The
draw for each request is seeded and depends only on the request body and how many times that same body was seen,
so a run's faults do not depend on thread scheduling.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qrb.io import setup_logging

log = logging.getLogger(__name__)

MODEL_ID = "qrb-smoke-extractive"
FINGERPRINT = "qrb-smoke-endpoint: extractive smoke-test stand-in, not a language model"
BANNER = ("qrb smoke endpoint: an OpenAI-compatible SMOKE-TEST stand-in. It is NOT a language model: it copies "
          "sentences of the paper's abstract into question/answer pairs (model id %s).")


@dataclasses.dataclass(frozen=True)
class Faults:
    """Injectable latency and faults; each rate is a probability per request (they are exclusive, summed <= 1)."""

    latency_s: float = 0.0          # added to every request
    rate_429: float = 0.0
    retry_after_s: float = 0.05     # sent as `retry-after-ms` and (rounded up) `Retry-After`
    rate_500: float = 0.0
    rate_stall: float = 0.0
    stall_s: float = 5.0            # a stalled reply comes after this long
    rate_invalid_json: float = 0.0
    rate_truncated: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        total = self.rate_429 + self.rate_500 + self.rate_stall + self.rate_invalid_json + self.rate_truncated
        if total > 1.0 + 1e-9:
            raise ValueError(f"smoke endpoint: fault rates sum to {total:.2f} > 1")

    def draw(self, body: bytes, occurrence: int) -> str | None:
        """The fault for the `occurrence`-th request with this body (deterministic), or None."""
        h = hashlib.sha256(f"{self.seed}:{occurrence}:".encode() + body).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        for name, rate in (("429", self.rate_429), ("500", self.rate_500), ("stall", self.rate_stall),
                           ("invalid_json", self.rate_invalid_json), ("truncated", self.rate_truncated)):
            if u < rate:
                return name
            u -= rate
        return None


# ---------------------------------------------------------------------------------------------------------------
# Extractive question/answer writing (pure functions)

_ABBREV = ("e.g.", "i.e.", "et al.", "cf.", "vs.", "Fig.", "Eq.", "Ref.", "approx.", "resp.")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'$\\])")
_STOP = {"we", "in", "this", "that", "these", "those", "here", "our", "the", "a", "an", "to", "of", "and", "paper",
         "work", "article", "letter", "it", "its", "also", "moreover", "furthermore", "however", "finally", "then",
         "thus", "therefore", "as", "such", "by", "for", "with", "on", "at", "from", "is", "are", "be", "can", "which",
         "show", "shows", "study", "studies", "present", "propose", "introduce", "consider", "demonstrate", "find",
         "further", "additionally", "while", "both", "all", "new", "first", "second", "using", "use", "when", "where",
         "there", "their", "they", "them", "has", "have", "been", "was", "were", "not", "or", "but", "how", "what",
         "into", "one", "two", "than", "more", "most", "very", "well", "same", "other", "so", "do", "does", "if"}
_FOCUS_WORDS = {
    "factual": (),
    "results": ("show", "demonstrat", "find", "found", "achiev", "improv", "outperform", "reduc", "bound", "scal",
                "%", "exponential", "faster", "fidelity", "error", "threshold", "result", "prove", "obtain"),
    "methods": ("method", "approach", "algorithm", "technique", "based on", "using", "we use", "develop", "construct",
                "framework", "protocol", "scheme", "numerical", "simulat", "model", "procedure"),
    "novelty": ("new", "novel", "first", "introduc", "propos", "unlike", "previous", "improv", "extend", "general",
                "open", "unknown", "here we", "in this work", "we present"),
    "definitions": (" is a ", " are ", "defin", "refer", "called", "known as", "describ", "consist", "denote",
                    "which is", "namely", "framework", "concept", "notion"),
}
_STEMS = {
    "factual": ("According to the paper \"{t}\", what is stated about {k}?",
                "What does the paper \"{t}\" say about {k}?",
                "In the paper \"{t}\", what is said regarding {k}?"),
    "results": ("What result does the paper \"{t}\" report concerning {k}?",
                "What does the paper \"{t}\" find about {k}?",
                "Which outcome regarding {k} is reported in the paper \"{t}\"?"),
    "methods": ("How does the paper \"{t}\" approach {k}?",
                "What method or setting does the paper \"{t}\" use for {k}?",
                "How is {k} handled in the paper \"{t}\"?"),
    "novelty": ("What is new in the paper \"{t}\" regarding {k}?",
                "What does the paper \"{t}\" contribute concerning {k}?",
                "Which advance about {k} does the paper \"{t}\" claim?"),
    "definitions": ("How does the paper \"{t}\" describe {k}?",
                    "What is meant by {k} in the paper \"{t}\"?",
                    "How is {k} characterised in the paper \"{t}\"?"),
}
_GARBLED = re.compile(r"[{}<>\\]|start_ARG|end_ARG|&[a-z]+;")
_MARKUP = re.compile(r"[$\\{}<>]|\\[a-zA-Z]+")


def split_sentences(text: str) -> list[str]:
    """Split an abstract into sentences (keeps abbreviations such as `e.g.` inside their sentence)."""
    text = " ".join(text.split())
    protected = text
    for i, abbr in enumerate(_ABBREV):
        protected = protected.replace(abbr, abbr.replace(".", f"\x00{i}\x00"))
    out = []
    for s in _SENT_SPLIT.split(protected):
        s = re.sub(r"\x00\d+\x00", ".", s).strip()
        if s:
            out.append(s)
    return out


_BREAK = {"can", "could", "will", "would", "may", "might", "is", "are", "was", "were", "has", "have", "had", "be",
          "been", "which", "that", "we", "our", "whose", "where", "while", "since", "because", "so", "than", "it",
          "they", "this", "these", "allows", "allow", "enables", "enable", "yields", "leads", "remains", "becomes"}
_TRAIL = {"of", "for", "the", "a", "an", "in", "on", "with", "and", "or", "to", "by", "at", "from", "as", "into"}


def _key_phrase(sentence: str, max_words: int = 7) -> str:
    """A short contiguous phrase of the sentence (a noun phrase, most of the time) for the question to name."""
    clean = re.sub(r"\$[^$]*\$", " , ", sentence)
    tokens = re.findall(r"[A-Za-z][A-Za-z0-9\-]*(?:'[a-z]+)?|[^\sA-Za-z]", _MARKUP.sub(" , ", clean))
    best: list[str] = []
    run: list[str] = []
    for tok in tokens + [","]:
        word = tok[0].isalpha()
        low = tok.lower()
        if word and not run and (low in _STOP or low in _BREAK or low.endswith("ing") or len(tok) < 2):
            continue
        if not word or low in _BREAK or len(run) >= max_words:
            while run and run[-1].lower() in _TRAIL | _STOP:
                run.pop()
            if sum(w.lower() not in _STOP for w in run) >= 2 and not best:
                best = run
            run = []
            continue
        run.append(tok)
    if not best:
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9\-]*", clean) if w.lower() not in _STOP and len(w) > 1]
        best = words[:5]
        if len(best) < 2:
            return ""
    first = best[0]
    if not (first.isupper() or any(c.isupper() for c in first[1:])):
        best[0] = first.lower()
    return " ".join(best)


def _short_title(title: str, limit: int = 160) -> str:
    title = " ".join(title.replace('"', "'").split())
    if len(title) <= limit:
        return title
    return title[:limit].rsplit(" ", 1)[0]


def _answer_text(sentence: str, limit: int = 2000) -> str:
    if len(sentence) <= limit:
        return sentence
    cut = sentence[:limit]
    return cut[:max(cut.rfind(", "), cut.rfind("; "), 10)].rstrip(",; ") + "."


def extractive_pairs(title: str, abstract: str, focus: str, n: int) -> list[dict[str, str]]:
    """Up to `n` question/answer pairs: answers are abstract sentences, questions name the title and a phrase."""
    focus = focus if focus in _STEMS else "factual"
    title = _short_title(title or "the untitled paper")
    sentences = [s for s in split_sentences(abstract or "") if len(s) >= 20]
    # skip sentences with markup outside LaTeX math (HTML, garbled MathML extraction), unless nothing else is left
    plain = [s for s in sentences if not _GARBLED.search(re.sub(r"\$[^$]*\$", "", s))]
    sentences = plain or sentences
    words = _FOCUS_WORDS[focus]
    order = list(_STEMS).index(focus)

    def score(item: tuple[int, str]) -> tuple:
        i, s = item
        low = f" {s.lower()} "
        hits = sum(w in low for w in words)
        markup = len(_MARKUP.findall(s))
        # rotate the starting sentence by focus so different prompts prefer different sentences
        return (-hits, markup > 0, (i - order) % max(len(sentences), 1))

    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for idx, (i, s) in enumerate(sorted(enumerate(sentences), key=score)):
        if len(pairs) >= n:
            break
        k = _key_phrase(s)
        if not k:
            continue
        stems = _STEMS[focus]
        for j in range(len(stems)):
            q = stems[(len(pairs) + j) % len(stems)].format(t=title, k=k)
            if q.lower() not in seen and 15 <= len(q) <= 400:
                seen.add(q.lower())
                pairs.append({"question": q, "answer": _answer_text(s)})
                break
    return pairs


_PAPER = re.compile(r"<paper>\s*(.*?)\s*</paper>", re.S | re.I)


def parse_user_message(text: str) -> dict[str, Any]:
    """What the generate stage put in its user message: title, abstract, focus, number of pairs."""
    m = None
    for m in _PAPER.finditer(text):
        pass
    block = m.group(1) if m else text
    title = re.search(r"^Title:\s*(.+)$", block, re.M)
    abstract = re.search(r"^(?:Abstract|Text):\s*(.*)", block, re.M | re.S)
    focus = re.search(r"Question focus:\s*([A-Za-z_]+)", text)
    n = re.search(r"exactly\s+(\d+)", text)
    return {
        "title": title.group(1).strip() if title else "",
        "abstract": abstract.group(1).strip() if abstract else block,
        "focus": focus.group(1).lower() if focus else "factual",
        "n": max(1, min(int(n.group(1)), 20)) if n else 3,
    }


def _array_key(response_format: dict[str, Any] | None) -> str:
    try:
        props = response_format["json_schema"]["schema"]["properties"]
        for name, spec in props.items():
            if spec.get("type") == "array":
                return name
    except (KeyError, TypeError, AttributeError):
        pass
    return "pairs"


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def completion(body: dict[str, Any], fault: str | None = None) -> dict[str, Any]:
    """A chat.completion object for a request body (deterministic in the body)."""
    messages = body.get("messages") or []
    user = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    prompt_text = "\n".join(str(m.get("content", "")) for m in messages)
    req = parse_user_message(user)
    pairs = extractive_pairs(req["title"], req["abstract"], req["focus"], req["n"])
    rf = body.get("response_format")
    payload = json.dumps({_array_key(rf): pairs}, ensure_ascii=False)
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        content = payload
    else:
        content = f"Here are the question-answer pairs:\n```json\n{payload}\n```"
    finish = "stop"
    if fault == "invalid_json":
        content = '{"pairs": [{"question": "' + (pairs[0]["question"] if pairs else "What") + '", "answer": '
    elif fault == "truncated":
        content = content[: max(1, len(content) // 2)]
        finish = "length"
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    pt, ct = _tokens(prompt_text), _tokens(content)
    return {
        "id": f"chatcmpl-smoke-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    }


# ---------------------------------------------------------------------------------------------------------------
# HTTP server

class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) drops bursts of connects: 1 s SYN retries
    daemon_threads = True


class SmokeEndpoint:
    """A running smoke endpoint: `.base_url` (ends in /v1), `.requests` (one dict per request seen)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 api_key: str | None = None) -> None:
        self.faults = faults or Faults()
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
            server_version = "qrb-smoke-endpoint"

            def log_message(self, fmt: str, *args: Any) -> None:  # no stderr noise, never headers
                log.debug("%s %s", self.address_string(), fmt % args)

            def do_GET(self) -> None:  # noqa: N802
                endpoint._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                endpoint._handle(self, "POST")

        self._server = _Server((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="smoke-endpoint", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def completions_count(self) -> int:
        with self._lock:
            return sum(r["path"].endswith("/chat/completions") for r in self.requests)

    def start(self) -> SmokeEndpoint:
        log.info(BANNER, MODEL_ID)
        log.info("qrb smoke endpoint: serving %s (faults: %s)", self.base_url, self.faults)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    # -- request handling ---------------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. after a stall)

    @staticmethod
    def _error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": type_, "param": None, "code": code}}

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0].rstrip("/")
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization", "")
        with self._lock:
            n = len(self.requests) + 1
            occurrence = self._seen.get(hashlib.sha256(raw).hexdigest(), 0)
            self._seen[hashlib.sha256(raw).hexdigest()] = occurrence + 1
            fault = self.faults.draw(raw, occurrence) if path.endswith("/chat/completions") else None
            record = {"n": n, "method": method, "path": path, "fault": fault, "time": time.time()}
            self.requests.append(record)
        log.info("smoke endpoint: request #%d %s %s%s", n, method, path, f" [fault: {fault}]" if fault else "")
        if self.faults.latency_s:
            self._stop.wait(self.faults.latency_s)
        if not auth.startswith("Bearer ") or (self.api_key is not None and auth != f"Bearer {self.api_key}"):
            return self._send(h, 401, self._error("Missing or invalid API key.", "invalid_request_error",
                                                  "invalid_api_key"))
        if method == "GET" and path in ("/v1/models", "/models"):
            return self._send(h, 200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "qrb-smoke-endpoint"}]})
        if method == "GET" and path in (f"/v1/models/{MODEL_ID}", f"/models/{MODEL_ID}"):
            return self._send(h, 200, {"id": MODEL_ID, "object": "model", "created": 0,
                                       "owned_by": "qrb-smoke-endpoint"})
        if not (method == "POST" and path.endswith("/chat/completions")):
            return self._send(h, 404, self._error(f"Unknown route {method} {path}", "invalid_request_error"))
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("`messages` must be a list")
        except ValueError as e:
            return self._send(h, 400, self._error(f"Invalid request body: {e}", "invalid_request_error"))
        if body.get("model") != MODEL_ID:
            return self._send(h, 404, self._error(
                f"The model `{body.get('model')}` does not exist; this smoke endpoint serves `{MODEL_ID}`.",
                "invalid_request_error", "model_not_found"))
        if fault == "429":
            ra = self.faults.retry_after_s
            return self._send(h, 429, self._error("Rate limit reached (injected by the smoke endpoint).",
                                                  "rate_limit_error", "rate_limit_exceeded"),
                              {"Retry-After": str(math.ceil(ra)), "retry-after-ms": str(int(ra * 1000))})
        if fault == "500":
            return self._send(h, 500, self._error("Internal server error (injected by the smoke endpoint).",
                                                  "server_error"))
        if fault == "stall":
            if self._stop.wait(self.faults.stall_s):
                return
        return self._send(h, 200, completion(body, fault))


@contextlib.contextmanager
def serve_smoke_endpoint(port: int = 0, faults: Faults | None = None, host: str = "127.0.0.1",
                         api_key: str | None = None) -> Iterator[SmokeEndpoint]:
    """Serve the smoke endpoint in a background thread for the duration of the `with` block."""
    ep = SmokeEndpoint(host=host, port=port, faults=faults, api_key=api_key).start()
    try:
        yield ep
    finally:
        ep.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qrb.offline.smoke_endpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8732)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    for name in ("429", "500", "stall", "invalid_json", "truncated"):
        ap.add_argument(f"--rate-{name.replace('_', '-')}", type=float, default=0.0, dest=f"rate_{name}")
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--retry-after-s", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="don't log each request")
    args = ap.parse_args(argv)
    setup_logging()
    if args.quiet:
        log.setLevel(logging.WARNING)
        logging.getLogger(__name__).warning(BANNER, MODEL_ID)
    faults = Faults(latency_s=args.latency, rate_429=args.rate_429, rate_500=args.rate_500,
                    rate_stall=args.rate_stall, stall_s=args.stall_s, rate_invalid_json=args.rate_invalid_json,
                    rate_truncated=args.rate_truncated, retry_after_s=args.retry_after_s, seed=args.seed)
    try:
        ep = SmokeEndpoint(host=args.host, port=args.port, faults=faults).start()
    except OSError as e:
        raise SystemExit(f"smoke endpoint: cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ep.stop()
        log.info("smoke endpoint: stopped after %d requests", len(ep.requests))


if __name__ == "__main__":
    main()
