"""Serve the fine-tuned model behind an OpenAI-compatible API, plus a web chat page.

    qrb serve                       # from a workspace (or repo) root; http://127.0.0.1:<serve.port>/
    qrb serve --port 0 --model artifacts/export/merged
    qrb serve --base --port 8001    # the base model alone (no adapter): open both pages side by side
    qrb serve --rag                 # answers from the papers retrieved from artifacts/index, citing them

Endpoints (FastAPI + uvicorn):
    GET  /                       a small chat page (static HTML + fetch to the API below, streaming)
    GET  /v1/models              the one model, named `serve.model_id`
    POST /v1/chat/completions    OpenAI chat completions, `stream: true` (server-sent events) or not
    GET  /health

The model is loaded as `qrb ask` loads it; a client's own system message replaces the default one. Bound to 127.0.0.1
unless `--host`/`serve.host` says otherwise; with QRB_SERVE_API_KEY set, /v1/ requests need `Authorization: Bearer
<key>`. Requests over the `serve:` limits get 400 or 413 in OpenAI's error format; one request generates at a time.
With `--rag` a reply names the papers it cites as a "Sources:" paragraph and `citations: [{doi, title, url}]`, and
abstains when nothing relevant is retrieved; an adapter with a gate answers from memory when sure (docs/using.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Generator, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from apps.bot import Bot, InputTooLong, add_model_args, app_parser, bot_from_args, bounded, run_app
from apps.page import page_html
from qrb.io import setup_logging
from qrb.retrieval import cite, sources_line

log = logging.getLogger(__name__)

API_KEY_ENV = "QRB_SERVE_API_KEY"


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        for p in self.content:
            if p.type != "text":
                raise ValueError(f"content parts of type {p.type!r} are not supported (text only)")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request this server honours; unknown fields are ignored."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over {limit} bytes (serve.max_request_bytes)", code="request_too_large")


def conversation(req: ChatRequest) -> list[dict[str, str]]:
    conv = []
    for i, m in enumerate(req.messages):
        try:
            text = m.text()
        except ValueError as e:
            raise ApiError(400, str(e), f"messages[{i}].content") from None
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i > 0:
            raise ApiError(400, "a system message is only accepted first", f"messages[{i}].role")
        conv.append({"role": role, "content": text})
    if conv[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return conv


def create_app(bot: Bot, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="Quantum Research Bot", docs_url=None, redoc_url=None, openapi_url=None)
    limits = bot.limits
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None and not authorized(request.headers.get("authorization", ""), api_key):
                return ApiError(401, "invalid or missing API key", code="invalid_api_key",
                                type_="authentication_error").response({"WWW-Authenticate": "Bearer"})
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
                return too_large(limits.max_request_bytes).response()
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": limits.model_id, "base_only": bot.base_only, "rag": bot.retriever is not None}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": limits.model_id, "object": "model", "created": created,
                                            "owned_by": "quantum-research-bot"}]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return page_html(limits.model_id, limits.max_new_tokens, key_required=api_key is not None,
                         base_only=bot.base_only, rag=bot.retriever is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()  # chunked uploads carry no content-length: measure what arrived
        if len(body) > limits.max_request_bytes:
            raise too_large(limits.max_request_bytes)
        req = parse_request(body)
        if req.model not in (None, limits.model_id):
            raise ApiError(404, f"model {req.model!r} not found; this server has {limits.model_id!r}", "model",
                           "model_not_found")
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        if req.stop:
            raise ApiError(400, "stop sequences are not supported", "stop")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {limits.max_new_tokens} (serve.max_new_tokens)",
                           "max_tokens")
        conv, shown = await run_in_threadpool(bot.ground, conversation(req))
        kw = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        try:
            reply, pieces = await run_in_threadpool(bot.respond, conversation(req), conv, shown, stream=req.stream,
                                                    **kw)
            if not req.stream:
                cites = cite(reply.text, shown or [])[1]
                message = {"role": "assistant", "content": reply.text + (f"\n\n{sources_line(cites)}" if cites else "")}
                if bot.retriever is not None:
                    message["citations"] = cites or []
                return {"id": cid, "object": "chat.completion", "created": now, "model": limits.model_id,
                        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason,
                                     "logprobs": None}], "usage": usage(reply)}
        except InputTooLong as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(sse(cid, now, limits.model_id, reply, pieces, include_usage, shown or []),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def authorized(header: str, api_key: str) -> bool:
    """`Bearer <key>`: the scheme is case-insensitive (RFC 9110 11.1), the key compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def parse_request(body: bytes) -> ChatRequest:
    """The body as a ChatRequest; anything else is a 400 in OpenAI's format (JSON is UTF-8: RFC 8259 8.1)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        raise ApiError(400, f"{loc}: {err['msg']}", loc or None) from None


def usage(reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def sse(cid: str, created: int, model: str, reply, pieces: Generator[str, None, None], include_usage: bool,
        shown: list = ()) -> Iterator[str]:
    """OpenAI's chunk stream: a role chunk, content deltas, [the sources chunk: the papers of the `shown` passages
    the answer cites], a finish chunk, [usage chunk], [DONE]."""

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
               **extra}
        if include_usage and "usage" not in extra:
            obj["usage"] = None
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces:
            yield chunk({"content": piece})
        if cites := cite(reply.text, shown)[1]:
            yield chunk({"content": f"\n\n{sources_line(cites)}", "citations": cites})
        yield chunk({}, reply.finish_reason)
        if include_usage:
            yield chunk(None, usage=usage(reply))
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        log.exception("generation failed")
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    finally:
        pieces.close()  # a client that went away stops generation


def parser() -> argparse.ArgumentParser:
    ap = app_parser("serve", __doc__)
    add_model_args(ap)
    ap.add_argument("--host", default=None,
                    help="bind address (default serve.host, 127.0.0.1; another needs QRB_SERVE_API_KEY set)")
    ap.add_argument("--port", type=bounded(int, lambda n: 0 <= n < 65536, "a port in 0..65535"), default=None,
                    help="port (default serve.port; 0 = any free port, printed by uvicorn)")
    return ap


def serve(args: argparse.Namespace) -> None:
    bot = bot_from_args(args)
    host = args.host or bot.limits.host
    port = bot.limits.port if args.port is None else args.port
    api_key = os.environ.get(API_KEY_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (set %s)", host,
                    API_KEY_ENV)
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(bot, api_key), host=host, port=port, log_level="info"))
    log.info("model %s (%s); web chat at http://%s:%s/ (port 0: see uvicorn's line below)%s",
             bot.limits.model_id, bot.source, host, port, "; API key required" if api_key else "")
    server.run()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging()
    run_app("qrb serve", lambda: serve(args))


if __name__ == "__main__":
    main()
