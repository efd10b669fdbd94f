"""The FastAPI app: routes of the OpenAI API, protection in front of them, errors in OpenAI's shape.

    app = create_app(LLM.load("default"), ServerConfig(api_keys=["sk-local"]))
    serve(app, host="127.0.0.1", port=8000)         # or: opengpt serve

One AsyncLLMEngine is shared by every request. In front of the routes, one plain ASGI middleware
checks the API key (constant time, before the body is read) and bounds the body size (413). A
bounded admission queue (serving.Admission) answers 429 with Retry-After when full. Each request
has a deadline; a non-streaming request whose client disconnects is cancelled, and a streaming one
stops at the disconnect; either way the engine request is aborted and its KV blocks freed. On
SIGTERM uvicorn stops accepting connections and lets running requests finish (graceful drain).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LLM
from ..engine.engine import AsyncLLMEngine, LLMEngine
from .metrics import ServerMetrics
from .assistant import Assistant, user_scope
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, FeedbackRequest
from .serving import EventStream, OpenAIServing

log = logging.getLogger("opengpt.server")
CHAT_PAGE = Path(__file__).with_name("chat.html")


@dataclass
class ServerConfig:
    model_names: list[str] = field(default_factory=lambda: ["default"])  # accepted in `model`; the first is listed
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_concurrency: int = 64  # sequences generating at once
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    max_body_bytes: int = 8 << 20
    request_timeout: float = 600.0  # seconds, queueing included

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names needs at least one name")
        for name, v in (("max_concurrency", self.max_concurrency), ("max_body_bytes", self.max_body_bytes)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.max_queue < 0 or self.request_timeout <= 0:
            raise ValueError("max_queue must be >= 0 and request_timeout > 0")


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    keys = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"the API key file {path} holds no key (one key per line)")
    return keys


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: API key on /v1 routes, then the body read up to max_body_bytes and replayed;
    counts every answer by route and status."""

    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.keys = [k.encode() for k in config.api_keys]

    def authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = False
        for key in self.keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.guarded(scope, receive, counted_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.inc(route=route, status=str(status[0] if status else 500))

    async def guarded(self, scope, receive, send):
        if self.keys and scope["path"].startswith("/v1") and not self.authorized(scope):
            return await _error(APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key"))(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _error(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                return await _error(too_large)(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect

        await self.app(scope, replay, send)


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, so the engine requests are aborted even
    when the client disconnects between two events, and whose admission slots are always returned."""

    def __init__(self, stream: EventStream):
        super().__init__(stream.events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.stream.events.aclose()
            finally:
                self.stream.close()


def create_app(llm: LLM, config: ServerConfig | None = None, engine: LLMEngine | None = None, *, safety=None,
               cache=None, feedback=None, router=None) -> FastAPI:
    """The app serving `llm`; `engine` defaults to an LLMEngine built with the LLM's engine settings.
    The assistant services (server.assistant) are optional: a safety Pipeline, a result Cache, a
    FeedbackStore (which also enables POST /v1/feedback) and a Router to other backends."""
    config = config or ServerConfig()
    engine = engine or LLMEngine(llm.model, llm.tokenizer.eos_token_ids, **llm.engine_args)
    aengine = AsyncLLMEngine(engine)
    pool = engine.kv.pool
    metrics = ServerMetrics({
        "requests_running": ("Requests in the engine (running or scheduled).", lambda: len(engine.requests)),
        "requests_waiting": ("Requests waiting for an admission slot.", lambda: len(serving.admission.queue)),
        "kv_blocks_in_use": ("KV cache blocks held by requests.", lambda: engine.num_blocks - pool.num_free),
        "kv_blocks_total": ("KV cache blocks in the pool.", lambda: engine.num_blocks),
    })
    serving = OpenAIServing(llm, aengine, config, metrics)
    assistant = Assistant(serving, safety, cache, feedback, router)
    services = any(x is not None for x in (safety, cache, feedback, router))
    created = int(time.time())

    app = FastAPI(title="opengpt", version="1", summary="OpenAI-compatible API of opengpt", docs_url="/docs",
                  redoc_url=None)
    app.state.engine, app.state.aengine, app.state.serving, app.state.metrics = engine, aengine, serving, metrics
    app.state.assistant = assistant

    app.add_middleware(Guard, config=config, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return _error(APIError(400, msg, param=".".join(loc) or None, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):
        msg = "no such route; the API lives under /v1 (see /docs)" if e.status_code == 404 else str(e.detail)
        return _error(APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def crash(_request: Request, e: Exception):
        log.exception("internal error")
        return _error(APIError(500, f"internal server error ({type(e).__name__}); see the server log"))

    async def run(request: Request, coro):
        """Await `coro` unless the client disconnects or the request's deadline passes first."""
        task = asyncio.ensure_future(coro)

        async def disconnected():
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=config.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task in done:
            result = task.result()
            return SSEResponse(result) if isinstance(result, EventStream) else JSONResponse(result)
        if watch in done:
            return Response(status_code=499)  # nobody is listening; nginx's code for a closed client
        raise APIError(504, f"the request ran past its {config.request_timeout:g} s timeout", code="timeout")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not services:
            return await run(request, serving.chat(body))
        if router is None:
            serving.check_model(body.model)
        user = user_scope(body.user, request.headers.get("authorization"))
        return await run(request, assistant.chat(body, user))

    @app.post("/v1/feedback")
    async def post_feedback(body: FeedbackRequest, request: Request):
        return await assistant.rate(body, user_scope(body.user, request.headers.get("authorization")))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(request, assistant.completions(body) if services else serving.completions(body))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await run(request, serving.embeddings(body))

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "opengpt",
                "max_model_len": llm.config.max_position_embeddings}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(config.model_names[0])]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        serving.check_model(name)
        return model_card(name)

    @app.get("/health")
    async def health():
        task = aengine.loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise APIError(503, f"the engine loop stopped: {task.exception()!r}")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float | None = 600.0,
          log_level: str = "info") -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM; running requests get `drain_timeout` s to finish."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                access_log=False)
