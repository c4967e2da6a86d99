"""The OpenAI front door of disaggregated serving: one router in front of prefill and decode engines.

Each engine is a normal tidal OpenAI server (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``) started with a role. For a client request the router

1. POSTs the client's body to a PREFILL engine on the same endpoint, changed: ``"stream": false``,
   ``"max_tokens": 1`` (``max_completion_tokens`` and ``stream_options`` removed, ``min_tokens``
   capped at 1) and ``"kv_transfer_params": {"do_remote_decode": true}``. The engine answers a normal
   JSON completion with an extra top-level ``kv_transfer_params``: an opaque object, or null when
   the request already finished at its first token;
2. POSTs the client's ORIGINAL body plus ``"kv_transfer_params": <the prefill engine's object>`` to a
   DECODE engine and relays its answer (JSON, or server-sent events ending in ``data: [DONE]``),
   which already holds the first token.

A request that finished at prefill (``kv_transfer_params: null``), or one that asked for a single
token (``max_tokens`` / ``max_completion_tokens`` 1: its prefill request is sent without
``kv_transfer_params``, so that no engine keeps KV for a decode that never comes), is answered from
the prefill response alone, as JSON or as OpenAI chunks. ``n`` > 1 is refused (400); other
parameters are the engines' to check, and an engine's 4xx reaches the client unchanged.

Balancing: per role, the healthy engine with the fewest requests in flight through this router;
ties go round robin. Health: a background task polls every engine's ``/health`` each
``health_interval`` seconds. An engine whose request fails with a connection error, a timeout or
a 5xx without an OpenAI error body is marked down at once and skipped until ``/health`` answers 200
again (a check that began before the failure does not count). A request that could not connect is
tried on the next healthy engine of the role (nothing reached the engine, so this is safe); any
other failure goes to the client: a 503/502 JSON error, or, mid-stream, an SSE event
``data: {"error": {..., "type": "service_unavailable"}}`` then ``data: [DONE]``. An engine that
falls silent is given up after ``request_timeout`` seconds without a byte. A client that goes away
mid-stream closes the upstream connection, so the decode engine aborts the request.

``build_router_app(prefill_urls, decode_urls, ...)`` makes the application; ``run_router(...)``
serves it until SIGINT/SIGTERM.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx

from tidal.serve.api_server import ApiError, error_response, install_error_handlers

logger = logging.getLogger("tidal.serve.router")

ROLES = ("prefill", "decode")


@dataclass(eq=False)
class _Engine:
    """One engine as the router sees it."""

    url: str
    role: str
    healthy: bool = True  # assumed until a check or a request says otherwise
    error: str | None = None  # why it is down
    down_at: float = float("-inf")  # time.monotonic() of the last failure
    in_flight: int = 0
    requests_total: int = 0
    failures_total: int = 0


class _Pool:
    """The engines of one role and the pick: fewest in flight among the healthy, ties round robin."""

    def __init__(self, role: str, urls: list[str]):
        self.role = role
        self.engines = [_Engine(url, role) for url in urls]
        self._next = 0

    def pick(self, exclude: set | frozenset = frozenset()) -> _Engine:
        best, best_i = None, 0
        n = len(self.engines)
        for k in range(n):
            i = (self._next + k) % n
            e = self.engines[i]
            if e.healthy and e not in exclude and (best is None or e.in_flight < best.in_flight):
                best, best_i = e, i
        if best is None:
            raise self.unavailable()
        self._next = best_i + 1
        best.in_flight += 1
        best.requests_total += 1
        return best

    def unavailable(self) -> ApiError:
        return ApiError(503, f"no healthy {self.role} engine ({self.describe_down()})", type="service_unavailable",
                        code="no_healthy_engine")

    def describe_down(self) -> str:
        down = [f"{e.url}: {e.error or 'down'}" for e in self.engines if not e.healthy]
        return "down: " + "; ".join(down) if down else "all healthy"

    def any_healthy(self) -> bool:
        return any(e.healthy for e in self.engines)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _error_event(message: str, type: str = "service_unavailable", code: str | None = "engine_failed") -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type, 'param': None, 'code': code}})}\n\n"


def _is_done(event: str) -> bool:
    return event.startswith("data:") and event[len("data:"):].strip() == "[DONE]"


def _is_error_body(content: bytes) -> bool:
    """Whether an engine's answer is an OpenAI error body (it knew what went wrong)."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def _check_urls(name: str, urls) -> list[str]:
    if isinstance(urls, str) or not isinstance(urls, (list, tuple)) or not urls:
        raise ValueError(f"{name}={urls!r} must be a non-empty list of engine URLs")
    out = []
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{name}: {url!r} must be an http(s) URL such as 'http://10.0.0.1:8000'")
        url = url.rstrip("/")
        if url in out:
            raise ValueError(f"{name}: {url!r} is listed twice")
        out.append(url)
    return out


# ---- request bodies and answers ------------------------------------------------------------------


def _requested_max_tokens(body: dict, chat: bool) -> int | None:
    """The client's token budget (chat: ``max_completion_tokens`` before ``max_tokens``, as the
    engines read it); checked here because the router acts on it."""
    name, value = "max_tokens", body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        name, value = "max_completion_tokens", body["max_completion_tokens"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ApiError(400, f"{name}={value!r} must be an integer >= 1", param=name)
    return value


def _prefill_body(body: dict, remote_decode: bool) -> dict:
    out = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens", "kv_transfer_params")}
    out["stream"] = False
    out["max_tokens"] = 1
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens > 1:
        # NOTE(router): the engines refuse min_tokens > max_tokens; 1 keeps "no EOS first" for the prefill token.
        out["min_tokens"] = 1
    if remote_decode:
        out["kv_transfer_params"] = {"do_remote_decode": True}
    return out


def _prefill_events(data: dict, chat: bool, include_usage: bool) -> list[str]:
    """A finished prefill answer as OpenAI stream chunks, ending in ``data: [DONE]``."""
    head = {"id": data.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": data.get("created", int(time.time())), "model": data.get("model")}

    def chunk(choices: list, usage=None) -> str:
        out = {**head, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    choices = [c for c in data.get("choices") or [] if isinstance(c, dict)]
    events = []
    if chat:
        events.append(chunk([{"index": c.get("index", i), "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for i, c in enumerate(choices)]))
    for i, c in enumerate(choices):
        tail = {"logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason"),
                "stop_reason": c.get("stop_reason")}
        if chat:
            text = (c.get("message") or {}).get("content") or ""
            events.append(chunk([{"index": c.get("index", i), "delta": {"content": text} if text else {}, **tail}]))
        else:
            events.append(chunk([{"index": c.get("index", i), "text": c.get("text") or "", **tail}]))
    if include_usage:
        events.append(chunk([], data.get("usage")))
    events.append("data: [DONE]\n\n")
    return events


def _event_stream_class():
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """Server-sent events that watch for the client leaving whatever the ASGI server's spec
        version, and run ``on_close`` however the stream ends (even if it never started)."""

        def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]] | None = None):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            import anyio

            async def stream():
                with contextlib.suppress(OSError):  # the client went away (ASGI spec >= 2.4 servers)
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            async def watch():
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(stream)
                    group.start_soon(watch)
            finally:
                await self.body_iterator.aclose()
                if self.on_close is not None:
                    await self.on_close()

    return EventStream


# ---- the application -----------------------------------------------------------------------------


def build_router_app(prefill_urls: list[str], decode_urls: list[str], api_key: str | None = None,
                     health_interval: float = 1.0, request_timeout: float = 600.0,
                     served_model_name: str | None = None, engine_api_key: str | None = None,
                     health_timeout: float = 5.0):
    """The FastAPI application routing OpenAI requests over prefill and decode engines.

    Parameters
    ----------
    prefill_urls, decode_urls : list of str
        Base URLs of the engines of each role, e.g. ``["http://10.0.0.1:8000"]``.
    api_key : str, optional
        When given, clients must send ``Authorization: Bearer <api_key>``.
    health_interval : float
        Seconds between two ``/health`` polls of one engine.
    request_timeout : float
        Seconds an engine may stay silent (no byte of its answer) before the request fails.
    served_model_name : str, optional
        The model name ``/v1/models`` answers and requests must name; by default the first healthy
        engine's ``/v1/models`` is relayed and the engines check ``model``.
    engine_api_key : str, optional
        Sent to the engines as ``Authorization: Bearer <engine_api_key>``; the client's own
        credentials are never forwarded.
    health_timeout : float
        Seconds one ``/health`` poll may take before the engine counts as down.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    prefill_urls = _check_urls("prefill_urls", prefill_urls)
    decode_urls = _check_urls("decode_urls", decode_urls)
    for name, value in (("health_interval", health_interval), ("request_timeout", request_timeout),
                        ("health_timeout", health_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}={value!r} must be a number of seconds > 0")
    pools = {"prefill": _Pool("prefill", prefill_urls), "decode": _Pool("decode", decode_urls)}
    engines = pools["prefill"].engines + pools["decode"].engines
    upstream_headers = {"Authorization": f"Bearer {engine_api_key}"} if engine_api_key else {}
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(request_timeout, connect=min(request_timeout, 5.0)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        headers=upstream_headers,
        trust_env=False,  # engine traffic never goes through the environment's HTTP proxy
    )
    created = int(time.time())
    EventStream = _event_stream_class()

    def mark_down(engine: _Engine, reason: str, failure: bool = True) -> None:
        engine.down_at = time.monotonic()
        engine.failures_total += failure
        if engine.healthy:
            logger.warning("%s engine %s is down: %s", engine.role, engine.url, reason)
        engine.healthy, engine.error = False, reason

    async def check(engine: _Engine) -> None:
        started = time.monotonic()
        try:
            r = await client.get(engine.url + "/health", timeout=health_timeout)
            reason = None if r.status_code == 200 else f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            reason = f"/health failed: {_describe(e)}"
        if reason is not None:
            mark_down(engine, reason, failure=False)
        elif not engine.healthy and started > engine.down_at:
            logger.info("%s engine %s is back", engine.role, engine.url)
            engine.healthy, engine.error = True, None

    async def poll(engine: _Engine) -> None:
        while True:
            await asyncio.sleep(health_interval)
            try:
                await check(engine)
            except Exception:  # never let one odd answer stop the polling
                logger.exception("health check of %s failed", engine.url)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await asyncio.gather(*(check(e) for e in engines))
        tasks = [asyncio.create_task(poll(e)) for e in engines]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

    app = FastAPI(title="tidal router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pools = pools

    install_error_handlers(app, logger)

    expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None

    def check_auth(request: Request) -> None:
        if expected_auth is None:
            return
        header = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(header, expected_auth):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if served_model_name is not None and model is not None and model != served_model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, f"stream={body['stream']!r} must be a boolean", param="stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or n != 1):
            raise ApiError(400, f"n={n!r} is not supported: the prefill/decode router serves one choice per "
                                f"request (n=1); send separate requests instead", param="n", code="n_not_supported")
        return body

    async def send(role: str, path: str, body: dict, stream: bool) -> tuple[_Engine, httpx.Response]:
        """An engine of ``role`` (counted in flight) and its answer's head (``stream``) or whole answer.
        A request that could not connect goes to the next healthy engine; other failures raise."""
        tried: set[_Engine] = set()
        while True:
            engine = pools[role].pick(tried)
            try:
                request = client.build_request("POST", engine.url + path, json=body)
                return engine, await client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                engine.in_flight -= 1
                mark_down(engine, _describe(e))
                tried.add(engine)
            except httpx.TransportError as e:
                engine.in_flight -= 1
                mark_down(engine, _describe(e))
                raise ApiError(503, f"the {role} engine {engine.url} failed: {_describe(e)}; it is marked down, "
                                    f"retry the request", type="service_unavailable", code="engine_failed") from None
            except BaseException:
                engine.in_flight -= 1
                raise

    async def unless_ok(engine: _Engine, response: httpx.Response) -> Response | None:
        """None for a 200; otherwise the engine's answer for the client (a 4xx, a 5xx with an error
        body), or ApiError 502 for a 5xx without one (the engine is marked down)."""
        if response.status_code == 200:
            return None
        content = await response.aread()
        await response.aclose()
        if response.status_code >= 500 and not _is_error_body(content):
            mark_down(engine, f"answered {response.status_code} without an error body")
            raise ApiError(502, f"the {engine.role} engine {engine.url} answered {response.status_code} without an "
                                f"error body; it is marked down, retry the request", type="bad_gateway",
                           code="engine_failed")
        return Response(content, status_code=response.status_code,
                        media_type=response.headers.get("content-type", "application/json"))

    async def prefill(path: str, body: dict, remote_decode: bool) -> dict | Response:
        engine, response = await send("prefill", path, body, stream=False)
        try:
            passthrough = await unless_ok(engine, response)
            if passthrough is not None:
                return passthrough
            try:
                data = response.json()
            except (ValueError, UnicodeDecodeError):
                data = None
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                raise ApiError(502, f"the prefill engine {engine.url} answered 200 without a completion body",
                               type="bad_gateway", code="bad_engine_answer")
            if remote_decode and ("kv_transfer_params" not in data
                                  or not isinstance(data["kv_transfer_params"], (dict, type(None)))):
                raise ApiError(502, f"the prefill engine {engine.url} answered without a kv_transfer_params object "
                                    f"(is it started with the prefill role?)", type="bad_gateway",
                               code="bad_engine_answer")
            return data
        finally:
            engine.in_flight -= 1

    async def relay(engine: _Engine, response: httpx.Response) -> AsyncIterator[str]:
        """The decode engine's events, whole ones only; a stream that breaks off ends with an error event."""
        done = False
        lines: list[str] = []
        try:
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                if lines:
                    event, lines = "\n".join(lines), []
                    yield event + "\n\n"
                    if _is_done(event):
                        done = True
                        break
            if not done and len(lines) == 1 and _is_done(lines[0]):  # no blank line after the last event
                yield "data: [DONE]\n\n"
                done = True
            if not done:
                yield _error_event(f"the decode engine {engine.url} ended the stream before data: [DONE]",
                                   code="incomplete_stream")
        except httpx.HTTPError as e:
            broken = isinstance(e, httpx.TransportError)  # not a bad byte in an answer: the engine or its link
            if broken:
                mark_down(engine, _describe(e))
            yield _error_event(f"the decode engine {engine.url} failed mid-stream: {_describe(e)}"
                               + ("; it is marked down, retry the request" if broken else ""))
        if not done:
            yield "data: [DONE]\n\n"

    def upstream_closer(engine: _Engine, response: httpx.Response) -> Callable[[], Awaitable[None]]:
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                engine.in_flight -= 1
                await response.aclose()

        return close

    async def serve(request: Request, chat: bool):
        body = await read_body(request)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        stream = body.get("stream", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        single = _requested_max_tokens(body, chat) == 1
        if not single and not pools["decode"].any_healthy():  # fail before a prefill whose KV nobody would take
            raise pools["decode"].unavailable()
        data = await prefill(path, _prefill_body(body, remote_decode=not single), remote_decode=not single)
        if isinstance(data, Response):
            return data
        kv_transfer_params = data.pop("kv_transfer_params", None)
        if kv_transfer_params is None or single:
            if not stream:
                return JSONResponse(data)

            async def events():
                for event in _prefill_events(data, chat, include_usage):
                    yield event

            return EventStream(events())
        engine, response = await send("decode", path, {**body, "kv_transfer_params": kv_transfer_params}, stream)
        close = upstream_closer(engine, response)
        try:
            passthrough = await unless_ok(engine, response)
        except BaseException:
            await close()
            raise
        if passthrough is not None or not stream:
            await close()
            return passthrough if passthrough is not None else Response(response.content,
                                                                         media_type="application/json")
        return EventStream(relay(engine, response), on_close=close)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        if served_model_name is not None:
            return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                                "owned_by": "tidal"}]}
        answers = []
        for engine in engines:
            if not engine.healthy:
                continue
            try:
                r = await client.get(engine.url + "/v1/models")
            except httpx.TransportError as e:
                mark_down(engine, _describe(e))
                continue
            if r.status_code == 200:
                return Response(r.content, media_type="application/json")
            answers.append(f"{engine.url} answered {r.status_code}")
        if answers:
            raise ApiError(502, f"no engine listed its models: {'; '.join(answers)}", type="bad_gateway",
                           code="bad_engine_answer")
        raise ApiError(503, f"no healthy engine answered /v1/models (prefill {pools['prefill'].describe_down()}; "
                            f"decode {pools['decode'].describe_down()})", type="service_unavailable",
                       code="no_healthy_engine")

    @app.get("/health")
    async def health():
        down = [role for role in ROLES if not pools[role].any_healthy()]
        if down:
            message = "; ".join(f"no healthy {role} engine ({pools[role].describe_down()})" for role in down)
            return error_response(503, message, "service_unavailable", code="no_healthy_engine")
        return {role: [{"url": e.url, "healthy": e.healthy, "in_flight": e.in_flight, "error": e.error}
                       for e in pools[role].engines] for role in ROLES}

    @app.get("/metrics")
    async def metrics():
        series = [("tidal_router_engine_healthy", "gauge", "1 while the engine answers /health.",
                   lambda e: int(e.healthy)),
                  ("tidal_router_engine_requests_in_flight", "gauge", "Requests in flight through this router.",
                   lambda e: e.in_flight),
                  ("tidal_router_engine_requests_total", "counter", "Requests sent to the engine.",
                   lambda e: e.requests_total),
                  ("tidal_router_engine_failures_total", "counter",
                   "Requests that failed at the engine (connection, timeout, 5xx without body).",
                   lambda e: e.failures_total)]
        lines = []
        for name, kind, help, value in series:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            for e in engines:
                url = e.url.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{name}{{role="{e.role}",url="{url}"}} {value(e)}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


# ---- running it ----------------------------------------------------------------------------------


def run_router(prefill_urls: list[str], decode_urls: list[str], host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, engine_api_key: str | None = None, health_interval: float = 1.0,
               request_timeout: float = 600.0, served_model_name: str | None = None) -> None:
    """Serves the router until SIGINT or SIGTERM: then it stops accepting connections, lets the
    requests in flight finish for up to 10 s, closes its engine connections and returns."""
    router_server(prefill_urls, decode_urls, host, port, api_key=api_key, engine_api_key=engine_api_key,
                  health_interval=health_interval, request_timeout=request_timeout,
                  served_model_name=served_model_name).run()


def router_server(prefill_urls: list[str], decode_urls: list[str], host: str, port: int, log_level: str = "info",
                  **options):
    """A uvicorn server of :func:`build_router_app` (``options`` are its keyword arguments) that
    returns normally on SIGINT / SIGTERM."""
    import uvicorn

    app = build_router_app(prefill_urls, decode_urls, **options)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful shutdown: return normally, do not re-raise

    # NOTE(tidal): idle keep-alive connections live 65 s (uvicorn's default is 5 s): a client pool
    # that reuses one the server has just closed sees a connection error, which 512 streaming
    # clients on a busy CPU met (bench/load.py)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            timeout_keep_alive=65)
    return _Server(config)
