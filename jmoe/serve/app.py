"""The OpenAI-compatible HTTP app (FastAPI) over an `Engine`, and `serve` to run it (uvicorn).

Endpoints: `POST /v1/completions` (text or token-id prompts, one or several; streaming as
server-sent events; `logprobs` and `echo` for scoring), `POST /v1/chat/completions` (with the
model's chat template), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). Responses
follow the OpenAI shapes and add a `jmoe` object with the mean experts run per MoE layer for each
generated token. Every refusal is a 4xx JSON error naming the offending field (429 when the
queue is full); a client that disconnects cancels its requests and frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import signal
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from jmoe.serve import protocol
from jmoe.serve.chat import ChatTemplateError, render_chat, template_tokens
from jmoe.serve.engine import Engine
from jmoe.serve.metrics import ServerMetrics
from jmoe.serve.outputs import ClosedError, Completion, QueueFullError
from jmoe.serve.protocol import APIError
from jmoe.serve.sampling import InvalidRequestError, SamplingParams, choice_seeds
from jmoe.serve.streaming import Submission, stream_chat, stream_completions


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


class APIKeyMiddleware:
    """Answers 401 to `/v1/*` requests without `Authorization: Bearer <key>` (pure ASGI: it
    runs before the body is read and leaves streaming responses alone)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                error = APIError(401, message, "authorization", code="invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
) -> FastAPI:
    """The HTTP app of `engine`; the engine's scheduler runs during the app's lifespan.

    Args:
      engine: the generation engine; `engine.name` is the model id.
      api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (else 401).
      max_prompt_tokens: longest prompt accepted (default: the model's context).
      max_tokens_limit: largest `max_tokens` accepted (default: the model's context).
    """
    context = engine.max_seq_len
    max_prompt_tokens = max_prompt_tokens or context
    max_tokens_limit = max_tokens_limit or context
    metrics = ServerMetrics(engine)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, True)  # after uvicorn's graceful wait: cancel the rest

    app = FastAPI(title="jmoe", lifespan=lifespan)
    if api_key:
        app.add_middleware(APIKeyMiddleware, key=api_key)

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        metrics.error(e.status)
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return _error_response(APIError(e.status_code, str(e.detail)))

    def check_model(name: str | None) -> None:
        if name not in (None, engine.name):
            message = f"model {name!r} does not exist; this server serves {engine.name!r}"
            raise APIError(404, message, "model", code="model_not_found")

    def sampling_params(body, max_tokens: int, **extra) -> list[SamplingParams]:
        """The parameters of each of the body's `n` choices (each with its own seed)."""
        if (unsupported := body.unsupported()) is not None:
            raise APIError(400, unsupported[1], unsupported[0])
        if max_tokens > max_tokens_limit:
            message = f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}"
            raise APIError(400, message, "max_tokens")
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=body.effective_top_k(),
                top_p=body.top_p,
                stop=body.stop,
                stop_token_ids=body.stop_token_ids or (),
                seed=None if body.seed is None else body.seed % 2**32,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                **extra,
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from None
        return [dataclasses.replace(params, seed=s) for s in choice_seeds(params.seed, body.n)]

    def encode(prompt, params: SamplingParams) -> list[int]:
        ids = engine.encode(prompt)
        if len(ids) > max_prompt_tokens:
            message = (
                f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}"
            )
            raise APIError(400, message, "prompt")
        try:
            engine.check(ids, params)
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from None
        return ids

    def submit(endpoint: str, prompts: list[list[int]], params: list[SamplingParams]) -> Submission:
        try:
            return Submission(engine, prompts, params, functools.partial(metrics.observe, endpoint))
        except QueueFullError as e:
            raise APIError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        except ClosedError as e:
            raise APIError(503, str(e), kind="server_error") from None

    async def finished(run: Submission, http_request: Request) -> list[Completion]:
        completions = await run.collect(http_request.is_disconnected)
        if completions is None:
            raise APIError(499, "the client closed the connection")
        for c in completions:
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.error}", kind="server_error")
            if c.finish_reason == "cancelled":
                raise APIError(503, "the server is shutting down", kind="server_error")
        return completions

    def head(prefix: str) -> dict:
        return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=engine.name)

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(http_request: Request):
        body = protocol.parse_body(protocol.CompletionRequest, await http_request.body())
        check_model(body.model)
        params = sampling_params(body, body.max_tokens, logprobs=body.logprobs, echo=body.echo)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "the prompt is empty: give at least one token", "prompt")
        ids = [encode(p, params[0]) for p in prompts]
        texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]
        # choice index = prompt index * n + choice of that prompt, as OpenAI numbers them
        n = body.n
        ids, texts = [i for i in ids for _ in range(n)], [t for t in texts for _ in range(n)]
        run = submit("completions", ids, params * len(prompts))
        top = dict(head("cmpl"), object="text_completion")
        if body.stream:
            events = stream_completions(run, top, texts, body.echo, include_usage(body), n)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await finished(run, http_request)
        choices = []
        for i, c in enumerate(done):
            entries = [*(c.prompt_logprobs or ()), *(c.logprobs or ())]
            logprobs = None
            if c.logprobs is not None:
                logprobs = protocol.completion_logprobs(engine.tokenizer, entries)
            text = texts[i] + c.text if body.echo else c.text
            choices.append(
                dict(index=i, text=text, logprobs=logprobs, finish_reason=c.finish_reason)
            )
        usage, stats = protocol.usage(done, n), protocol.jmoe_stats(done)
        return dict(top, choices=choices, usage=usage, jmoe=stats)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        body = protocol.parse_body(protocol.ChatCompletionRequest, await http_request.body())
        check_model(body.model)
        if engine.chat_template is None:
            message = (
                f"model {engine.name!r} has no chat template (its tokenizer directory holds no "
                "tokenizer_config.json with a chat_template): use /v1/completions"
            )
            raise APIError(400, message, "messages")
        try:
            prompt = render_chat(
                engine.chat_template,
                [m.template_dict(i) for i, m in enumerate(body.messages)],
                **template_tokens(engine.tokenizer),
            )
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None
        ids = engine.tokenizer.encode(prompt)  # the template wrote the special tokens
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as OpenAI: up to the context
            max_tokens = max(min(max_tokens_limit, context - len(ids)), 0)
        params = sampling_params(body, max_tokens)
        run = submit("chat", [encode(ids, params[0])] * body.n, params)
        if body.stream:
            events = stream_chat(run, head("chatcmpl"), include_usage(body))
            return StreamingResponse(events, media_type="text/event-stream")
        done = await finished(run, http_request)
        choices = [
            dict(
                index=i,
                message=dict(role="assistant", content=c.text),
                logprobs=None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(done)
        ]
        usage, stats = protocol.usage(done, body.n), protocol.jmoe_stats(done)
        return dict(
            head("chatcmpl"), object="chat.completion", choices=choices, usage=usage, jmoe=stats
        )

    @app.get("/v1/models")
    async def models():
        card = dict(
            id=engine.name,
            object="model",
            created=started,
            owned_by="jmoe",
            max_model_len=context,
            expert_quantization=engine.config.moe.expert_quantization,  # None: float experts
        )
        return dict(object="list", data=[card])

    @app.get("/health")
    async def health():
        scheduler = engine.scheduler
        return dict(
            status="ok",
            model=engine.name,
            slots=engine.num_slots,
            active_slots=scheduler.active_slots,
            queue_depth=scheduler.queue_depth,
        )

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    **app_options,
) -> None:
    """Serves `create_app(engine, **app_options)` with uvicorn until SIGINT / SIGTERM.

    On a signal the server stops accepting connections, lets in-flight requests finish for up
    to `graceful_timeout` seconds, cancels what is left, and returns.
    """
    app = create_app(engine, **app_options)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()  # no signal handling off the main thread
        return
    # uvicorn re-raises the signal after its graceful shutdown, under the handlers it found;
    # no-op ones make that re-raise harmless, so `serve` returns and the process exits with 0.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
