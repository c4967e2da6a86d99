"""An OpenAI-compatible HTTP server over the asynchronous engine (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /health`` and
``GET /metrics`` (Prometheus text format). Errors use OpenAI's body shape
``{"error": {"message", "type", "param", "code"}}`` and never carry a traceback.

``build_app(engine, served_model_name, api_key)`` makes the application; ``run_server(config, ...)``
loads the model and serves until SIGINT/SIGTERM, then aborts what is in flight and returns.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tidal.serve import openapi
from tidal.serve.async_engine import AsyncLLMEngine
from tidal.serve.engine import EngineConfig, ProcessedPrompt
from tidal.serve.outputs import RequestOutput
from tidal.serve.sampling_params import SamplingParams

logger = logging.getLogger("tidal.serve.api_server")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiError(Exception):
    """An error answered in OpenAI's body shape (``headers``: extra response headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def install_error_handlers(app, log: logging.Logger) -> None:
    """Every error of ``app`` in OpenAI's body shape: ApiError as raised, a body that fails
    validation as a 400, HTTP errors (404, 405) with their status, anything else a logged 500
    without a traceback."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(400, "invalid request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("unhandled error serving %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", "internal_server_error")


def _bad_param(e: Exception) -> ApiError:
    """A ValueError of SamplingParams or the engine ("name=value must ...") as a 400 naming the parameter."""
    message = str(e)
    m = re.match(r"([A-Za-z_]+)=", message)
    param = m.group(1) if m else ("prompt" if "prompt" in message else None)
    return ApiError(400, message, param=param)


# ---- metrics -------------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class _Metrics:
    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {}
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.tpot = _Histogram(_TPOT_BUCKETS)

    def record(self, output: RequestOutput | None, reason: str) -> None:
        self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
        if output is None:
            return
        self.prompt_tokens += len(output.prompt_token_ids)
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        self.generation_tokens += num_tokens
        m = output.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(max(m.first_token_time - m.arrival_time, 0.0))
            per_seq = max((len(o.token_ids) for o in output.outputs), default=0)
            if per_seq > 1 and m.last_token_time is not None:
                self.tpot.observe(max(m.last_token_time - m.first_token_time, 0.0) / (per_seq - 1))

    def render(self, stats: dict, model: str) -> str:
        escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        label = f'{{model_name="{escaped}"}}'
        queries = stats.get("prefix_cache_query_tokens", 0)
        hit_rate = stats.get("prefix_cache_hit_tokens", 0) / queries if queries else 0.0
        gauges = [
            ("tidal_num_requests_running", "Requests being generated.", stats.get("num_requests_running", 0)),
            ("tidal_num_requests_waiting", "Requests waiting to be scheduled.", stats.get("num_requests_waiting", 0)),
            ("tidal_kv_blocks_used", "KV cache blocks in use.", stats.get("kv_blocks_used", 0)),
            ("tidal_kv_blocks_total", "KV cache blocks in the pool.", stats.get("kv_blocks_total", 0)),
            ("tidal_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens queried.",
             hit_rate),
        ]
        counters = [
            ("tidal_num_preemptions_total", "Preemptions by the scheduler.", stats.get("preemptions", 0)),
            ("tidal_prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("tidal_generation_tokens_total", "Generated tokens of finished requests.", self.generation_tokens),
        ]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name}{label} {value}"]
        for name, help, value in counters:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name}{label} {value}"]
        name = "tidal_request_success_total"
        lines += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
        for reason, count in sorted(self.requests_finished.items()):
            lines.append(f'{name}{{model_name="{escaped}",finished_reason="{reason}"}} {count}')
        for name, help, hist in (("tidal_time_to_first_token_seconds", "Time to first token.", self.ttft),
                                 ("tidal_time_per_output_token_seconds", "Time per output token.", self.tpot)):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(lines) + "\n"


# ---- chat template -------------------------------------------------------------------------------


@dataclass
class ServerLimits:
    """What one request may ask of a public server (each past its bound is a 400, a body past
    ``max_request_bytes`` a 413, a request past ``max_concurrent_requests`` in flight a 429 with
    ``Retry-After``). ``max_prompt_tokens`` None means the engine's ``max_model_len``."""

    max_request_bytes: int = 32 << 20
    max_prompt_tokens: int | None = None
    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_concurrent_requests: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_n", "max_stop_strings", "max_stop_length", "max_concurrent_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs={self.max_logprobs!r} must be an integer >= 0")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens!r} must be None or an integer >= 1")

    def check(self, params: SamplingParams, chat: bool = False) -> None:
        """400 for a request past the per-request bounds."""
        if params.n > self.max_n:
            raise ApiError(400, f"n={params.n} exceeds this server's limit of {self.max_n}", param="n")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            name = "top_logprobs" if chat else "logprobs"  # chat asks for the top ones by that name
            raise ApiError(400, f"{name}={params.logprobs} exceeds this server's limit of {self.max_logprobs}",
                           param=name)
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.max_logprobs:
            raise ApiError(400, f"prompt_logprobs={params.prompt_logprobs} exceeds this server's limit of "
                                f"{self.max_logprobs}", param="prompt_logprobs")
        stops = params.stop_strings
        if len(stops) > self.max_stop_strings:
            raise ApiError(400, f"stop has {len(stops)} strings; this server takes at most {self.max_stop_strings}",
                           param="stop")
        long = [s for s in stops if len(s) > self.max_stop_length]
        if long:
            raise ApiError(400, f"stop string {long[0][:40]!r}... is {len(long[0])} characters long; this server takes "
                                f"at most {self.max_stop_length}", param="stop")


_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
_MAX_MEDIA_BYTES = 64 << 20


@dataclass
class MediaOptions:
    """What the server accepts in chat content parts: ``allow_urls`` fetches http(s) image and
    video URLs (off by default: only data URLs); ``max_per_prompt`` bounds the items of one
    request; ``fetch_timeout`` (seconds) and ``max_bytes`` bound a fetch."""

    allow_urls: bool = False
    max_per_prompt: int = 8
    fetch_timeout: float = 10.0
    max_bytes: int = _MAX_MEDIA_BYTES


def _media_bytes(url, where: str, options: MediaOptions) -> bytes:
    """The bytes a content part's URL holds: a base64 data URL, or (when allowed) an http(s) URL."""
    import base64
    import binascii

    if not isinstance(url, str):
        raise ApiError(400, f"{where}.url must be a string", param="messages")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URL must be 'data:<type>;base64,<data>'", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL's base64 payload does not decode", param="messages") from None
    elif url.startswith(("http://", "https://")):
        if not options.allow_urls:
            raise ApiError(400, f"{where}: this server takes images as data URLs only (start it with "
                                f"--allow-media-urls to fetch http(s) URLs)", param="messages", code="url_not_allowed")
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=options.fetch_timeout) as response:
                data = response.read(options.max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ApiError(400, f"{where}: fetching {url[:100]!r} failed: {e}", param="messages") from None
    else:
        raise ApiError(400, f"{where}.url must be a data URL or an http(s) URL, got {url[:40]!r}", param="messages")
    if len(data) > options.max_bytes:
        raise ApiError(400, f"{where}: the item is larger than {options.max_bytes} bytes", param="messages")
    return data


def _render_chat(tokenizer, messages, placeholders: dict[str, str] | None = None,
                 media: MediaOptions | None = None) -> tuple[str, dict]:
    """(prompt text, multi_modal_data) of a chat request. ``placeholders`` (modality -> the text
    that stands for one item; None for a text-only model) decides whether image and video parts are
    allowed. The template sees each such part as ``{"type": "image"}`` (what vision-language chat
    templates expect); one that ignores them gets string content with the placeholder text instead."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template (tokenizer_config.json has no 'chat_template'); "
                            "use /v1/completions", param="messages", code="no_chat_template")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    media = media or MediaOptions()
    parted, flat = [], []
    data: dict[str, list[bytes]] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text, and images/videos on a multimodal model
            parts, texts = [], []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                where = f"messages[{i}].content[{j}]"
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append(part["text"])
                elif kind in _MEDIA_PARTS:
                    modality = _MEDIA_PARTS[kind]
                    if placeholders is None:
                        raise ApiError(400, f"{where}: this model takes text only; {kind} parts are not supported",
                                       param="messages", code="multimodal_not_supported")
                    if modality not in placeholders:
                        raise ApiError(400, f"{where}: this model does not take {modality}s", param="messages")
                    spec = part.get(kind)
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    items = data.setdefault(modality, [])
                    if sum(len(v) for v in data.values()) >= media.max_per_prompt:
                        raise ApiError(400, f"{where}: more than {media.max_per_prompt} images and videos in one "
                                            f"request", param="messages", code="too_many_items")
                    items.append(_media_bytes(url, f"{where}.{kind}", media))
                    parts.append({"type": modality})
                    texts.append(placeholders[modality])
                else:
                    allowed = "text parts" if placeholders is None else \
                        "text, " + " and ".join(k for k, v in _MEDIA_PARTS.items() if v in placeholders) + " parts"
                    raise ApiError(400, f"{where}: only {allowed} are supported", param="messages")
            parted.append({**m, "content": parts})
            flat.append({**m, "content": "".join(texts)})
        elif content is None or isinstance(content, str):
            parted.append({**m, "content": content or ""})
            flat.append({**m, "content": content or ""})
        else:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts", param="messages")
    try:
        if data:
            text = tokenizer.apply_chat_template(parted, add_generation_prompt=True)
            wanted = {mod: len(items) for mod, items in data.items()}
            if any(text.count(placeholders[mod]) < n for mod, n in wanted.items()):
                text = tokenizer.apply_chat_template(flat, add_generation_prompt=True)
            return text, data
        return tokenizer.apply_chat_template(flat, add_generation_prompt=True), {}
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None


# ---- request parsing -----------------------------------------------------------------------------


def _get(body: dict, name: str, kinds: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{name}={value!r} must be of type {names}", param=name)
    return value


def _sampling_params(body: dict, chat: bool) -> tuple[SamplingParams, bool]:
    """SamplingParams from a request body (max_tokens None means "until max_model_len"), and whether the
    caller asked for logprobs."""
    num = (int, float)
    kwargs = dict(
        n=_get(body, "n", (int,), 1),
        temperature=float(_get(body, "temperature", num, 1.0)),
        top_p=float(_get(body, "top_p", num, 1.0)),
        top_k=_get(body, "top_k", (int,), -1),
        min_p=float(_get(body, "min_p", num, 0.0)),
        seed=_get(body, "seed", (int,)),
        min_tokens=_get(body, "min_tokens", (int,), 0),
        stop=_get(body, "stop", (str, list)),
        stop_token_ids=_get(body, "stop_token_ids", (list,)),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        presence_penalty=float(_get(body, "presence_penalty", num, 0.0)),
        frequency_penalty=float(_get(body, "frequency_penalty", num, 0.0)),
        repetition_penalty=float(_get(body, "repetition_penalty", num, 1.0)),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
    )
    max_name = "max_tokens"
    max_tokens = _get(body, "max_tokens", (int,))
    if chat and body.get("max_completion_tokens") is not None:
        max_name, max_tokens = "max_completion_tokens", _get(body, "max_completion_tokens", (int,))
    if max_tokens is None and not chat:
        max_tokens = 16
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{max_name}={max_tokens!r} must be an integer >= 1", param=max_name)
    if chat:
        want = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,))
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, f"top_logprobs={top!r} must be in [0, 20]", param="top_logprobs")
        if top and not want:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _get(body, "logprobs", (int,))
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ApiError(400, f"logprobs={logprobs!r} must be in [0, 20]", param="logprobs")
        kwargs["prompt_logprobs"] = _get(body, "prompt_logprobs", (int,))
    if kwargs["min_tokens"] and max_tokens is None:
        max_tokens = max(kwargs["min_tokens"], 16)
    try:
        params = SamplingParams(max_tokens=max_tokens or 16, logprobs=logprobs, **kwargs)
    except (ValueError, TypeError) as e:
        raise _bad_param(e) from None
    if max_tokens is None:
        params.max_tokens = None  # filled per prompt from max_model_len
    return params, logprobs is not None


def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                        "token-id lists, and not empty", param="prompt")


# ---- the application -----------------------------------------------------------------------------


class _Inflight:
    """The engine requests of one HTTP request, merged into one queue of (prompt index, output)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    def cancel(self, reason: str = "abort") -> None:
        for t in self.tasks:
            t.cancel()
        self.queue.put_nowait(("cancel", reason))


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              media: MediaOptions | None = None, limits: ServerLimits | None = None):
    """The FastAPI application serving ``engine`` under the model name ``served_model_name``;
    ``media`` says which image and video inputs chat requests may carry (a vision-language model),
    ``limits`` what one request may ask (defaults that protect a public server)."""
    from fastapi import FastAPI, Request
    from starlette.requests import ClientDisconnect
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    core = engine.engine
    tokenizer = core.tokenizer
    media = media or MediaOptions()
    limits = limits or ServerLimits()
    max_prompt_tokens = min(limits.max_prompt_tokens or core.max_model_len, core.max_model_len)
    placeholders = None  # modality -> the text a chat template writes for one item
    if core.is_multimodal and tokenizer is not None:
        placeholders = {m: tokenizer.decode(core.model.prompt_placeholder(m), skip_special_tokens=False)
                        for m in core.model.modalities}
    max_model_len = core.max_model_len
    metrics = _Metrics()
    inflight: set[_Inflight] = set()
    created = int(time.time())

    app = FastAPI(title="tidal", version=__import__("tidal").__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.engine = engine
    app.state.metrics = metrics

    def abort_all(reason: str = "abort") -> None:
        """Ends every request in flight (graceful shutdown); their blocks go back to the pool."""
        for item in list(inflight):
            item.cancel(reason)

    app.state.abort_all = abort_all

    install_error_handlers(app, logger)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):  # constant time
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise ApiError(413, f"the request body has {declared} bytes; this server takes at most "
                                f"{limits.max_request_bytes}", code="request_too_large")
        raw = bytearray()
        try:
            async for piece in request.stream():  # bounded however the body is framed (chunked included)
                raw += piece
                if len(raw) > limits.max_request_bytes:
                    raise ApiError(413, f"the request body is larger than this server's {limits.max_request_bytes} "
                                        f"bytes", code="request_too_large")
        except ClientDisconnect:  # nobody is left to answer; not a server error
            raise ApiError(400, "the client disconnected before sending its whole body",
                           code="client_disconnected") from None
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        return body

    def prepare(prompts: list, params: SamplingParams) -> list[tuple[ProcessedPrompt, SamplingParams]]:
        """Processed prompts with per-prompt params; a ValueError of the engine becomes a 400."""
        out = []
        for p in prompts:
            try:
                processed = core.process_prompt(p, params)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") if isinstance(p, dict) else _bad_param(e) from None
            ids = processed.token_ids
            if len(ids) > max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {max_prompt_tokens}",
                               param="messages" if isinstance(p, dict) else "prompt", code="prompt_too_long")
            if params.max_tokens is None:
                try:
                    per = SamplingParams(**{**_fields(params), "max_tokens": max(max_model_len - len(ids), 1)})
                except ValueError as e:
                    raise _bad_param(e) from None
            else:
                per = params
            out.append((processed, per))
        return out

    def start(prepared, request_id: str, kv_transfer_params: dict | None = None) -> _Inflight:
        item = _Inflight()

        async def consume(index: int, ids: ProcessedPrompt, params: SamplingParams):
            last = None
            reason = "abort"
            try:
                async for output in engine.generate(ids, params, request_id=f"{request_id}-{index}",
                                                    kv_transfer_params=kv_transfer_params):
                    last = output
                    item.queue.put_nowait((index, output))
                if last is not None and last.finished:
                    reasons = {o.finish_reason for o in last.outputs}
                    reason = "error" if "error" in reasons else "length" if reasons == {"length"} else "stop"
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = "error"
                item.queue.put_nowait(("error", f"{type(e).__name__}: {e}"))
            finally:
                metrics.record(last, reason)

        for i, (ids, params) in enumerate(prepared):
            item.tasks.append(asyncio.get_running_loop().create_task(consume(i, ids, params)))
        inflight.add(item)
        return item

    async def outputs(item: _Inflight, count: int) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the requests advance, until all finish; raises ApiError on failure."""
        done = 0
        try:
            while done < count:
                index, output = await item.queue.get()
                if index == "cancel":
                    raise ApiError(503, "the request was aborted: the server is shutting down",
                                   type="service_unavailable", code="aborted")
                if index == "error":
                    raise ApiError(500, f"generation failed: {output}", type="internal_server_error")
                if output.error:
                    raise ApiError(500, f"generation failed: {output.error}", type="internal_server_error")
                yield index, output
                if output.finished:
                    done += 1
        finally:
            inflight.discard(item)
            for t in item.tasks:
                if not t.done():
                    t.cancel()

    def usage(prepared, finals: dict[int, RequestOutput]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p, _ in prepared)
        completion = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def token_str(token_id: int) -> str:
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(sample, start: int, text_offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, lps in zip(sample.token_ids[start:], (sample.logprobs or [])[start:]):
            s = token_str(token_id)
            tokens.append(s)
            token_lps.append(lps.get(token_id))
            tops.append({token_str(t): lp for t, lp in lps.items()})
            offsets.append(text_offset)
            text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs(output: RequestOutput, top: int) -> list:
        """An output's prompt log-probs as a completions choice carries them: None for the first token,
        then {token id: {"logprob", "rank", "decoded_token"}}; a prompt token outside the top ones has
        rank null."""
        out = []
        for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs or []):
            if entry is None:
                out.append(None)
                continue
            outside = len(entry) > top
            top_ones = [kv for kv in entry.items() if not (outside and kv[0] == token_id)]
            ranked = sorted(top_ones, key=lambda kv: -kv[1])
            item = {str(t): {"logprob": lp, "rank": i + 1, "decoded_token": token_str(t)}
                    for i, (t, lp) in enumerate(ranked)}
            if outside:
                item[str(token_id)] = {"logprob": entry[token_id], "rank": None, "decoded_token": token_str(token_id)}
            out.append(item)
        return out

    def chat_logprobs(sample, start: int, top: int) -> dict:
        content = []
        for token_id, lps in zip(sample.token_ids[start:], (sample.logprobs or [])[start:]):
            s = token_str(token_id)
            ranked = sorted(lps.items(), key=lambda kv: -kv[1])[:top]
            content.append({"token": s, "logprob": lps.get(token_id), "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": token_str(t), "logprob": lp,
                                              "bytes": list(token_str(t).encode("utf-8"))} for t, lp in ranked]})
        return {"content": content}

    admitting = [0]  # requests past the limit check and not yet in `inflight`

    async def serve(request: Request, chat: bool):
        if len(inflight) + admitting[0] >= limits.max_concurrent_requests:
            raise ApiError(429, f"{len(inflight) + admitting[0]} requests are in flight, this server's limit; retry "
                                f"shortly", type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": "1"})
        admitting[0] += 1
        try:
            return await admitted(request, chat)
        finally:
            admitting[0] -= 1

    def check_length(text: str, param: str) -> None:
        # NOTE(tidal): no tokenizer turns more than a few dozen characters into one token, so a text
        # past 64 characters per allowed token is refused before it is tokenized (which would hold
        # memory and a thread for seconds per megabyte)
        if len(text) > 64 * max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(text)} characters, far past this server's limit of "
                                f"{max_prompt_tokens} tokens", param=param, code="prompt_too_long")

    def tokenized(text: str, data: dict) -> list:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return [{"prompt_token_ids": ids, "multi_modal_data": data} if data else ids]

    async def admitted(request: Request, chat: bool):
        body = await read_body(request)
        params, want_logprobs = _sampling_params(body, chat)
        limits.check(params, chat)
        if params.prompt_logprobs is not None and body.get("stream", False):
            raise ApiError(400, "prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        if chat:
            text, data = _render_chat(tokenizer, body.get("messages"), placeholders, media)
            check_length(text, "messages")
            prompts = await asyncio.to_thread(tokenized, text, data)
        else:
            prompts = _prompts(body)
            for p in prompts:
                if isinstance(p, str):
                    check_length(p, "prompt")
        # tokenizing and (multimodal) decoding and resizing images are CPU work: off the event loop
        prepared = await asyncio.to_thread(prepare, prompts, params)
        n = params.n
        stream = body.get("stream", False)
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(stream_options.get("include_usage", False))
        top = params.logprobs or 0
        prefix = "chatcmpl" if chat else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        kv_transfer_params = body.get("kv_transfer_params")  # disaggregated serving: set by the router
        if kv_transfer_params is not None:
            if core.transfers is None:
                raise ApiError(400, "kv_transfer_params given, but this server runs no prefill or decode role",
                               param="kv_transfer_params")
            if len(prepared) != 1:
                raise ApiError(400, "disaggregated serving takes one prompt per request", param="prompt")
            try:
                core.check_transfer_params(kv_transfer_params, prepared[0][1])
            except ValueError as e:
                raise ApiError(400, str(e), param="kv_transfer_params") from None
        item = start(prepared, request_id, kv_transfer_params)

        if not stream:
            finals: dict[int, RequestOutput] = {}
            async for index, output in outputs(item, len(prepared)):
                if output.finished:
                    finals[index] = output
            choices = []
            for index in range(len(prepared)):
                for sample in finals[index].outputs:
                    choice_index = index * n + sample.index
                    if chat:
                        choices.append({"index": choice_index,
                                        "message": {"role": "assistant", "content": sample.text},
                                        "logprobs": chat_logprobs(sample, 0, top) if want_logprobs else None,
                                        "finish_reason": sample.finish_reason,
                                        "stop_reason": sample.stop_reason})
                    else:
                        choices.append({"index": choice_index, "text": sample.text,
                                        "logprobs": completion_logprobs(sample, 0, 0) if want_logprobs else None,
                                        "finish_reason": sample.finish_reason,
                                        "stop_reason": sample.stop_reason})
                        if params.prompt_logprobs is not None:
                            choices[-1]["prompt_logprobs"] = prompt_logprobs(finals[index], params.prompt_logprobs)
            response = {"id": request_id, "object": obj, "created": now, "model": served_model_name,
                        "choices": choices, "usage": usage(prepared, finals)}
            if core.transfers is not None and core.transfers.role == "prefill" and kv_transfer_params is not None:
                response["kv_transfer_params"] = finals[0].kv_transfer_params
            return JSONResponse(response)

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage_value=None, with_usage=True):
            data = {"id": request_id, "object": chunk_obj, "created": now, "model": served_model_name,
                    "choices": choices}
            if include_usage and with_usage:
                data["usage"] = usage_value
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            sent_text: dict[int, int] = {}
            sent_tokens: dict[int, int] = {}
            finals: dict[int, RequestOutput] = {}
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(len(prepared) * n)])
                async for index, output in outputs(item, len(prepared)):
                    if output.finished:
                        finals[index] = output
                    choices = []
                    for sample in output.outputs:
                        ci = index * n + sample.index
                        t0, k0 = sent_text.get(ci, 0), sent_tokens.get(ci, 0)
                        if len(sample.text) == t0 and len(sample.token_ids) == k0 and sample.finish_reason is None:
                            continue
                        if len(sample.text) == t0 and sample.finish_reason is None and not want_logprobs:
                            continue  # tokens that completed no text yet
                        delta = sample.text[t0:]
                        sent_text[ci], sent_tokens[ci] = len(sample.text), len(sample.token_ids)
                        if chat:
                            choice = {"index": ci, "delta": {"content": delta} if delta else {},
                                      "logprobs": chat_logprobs(sample, k0, top) if want_logprobs else None,
                                      "finish_reason": sample.finish_reason}
                        else:
                            choice = {"index": ci, "text": delta,
                                      "logprobs": completion_logprobs(sample, k0, t0) if want_logprobs else None,
                                      "finish_reason": sample.finish_reason}
                        if sample.finish_reason is not None:
                            choice["stop_reason"] = sample.stop_reason
                        choices.append(choice)
                    if choices:
                        yield chunk(choices)
                if include_usage:
                    yield chunk([], usage(prepared, finals))
            except ApiError as e:
                err = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
                yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(_closing(events(), item), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", **openapi.generation_route(openapi.completion_request(limits),
                                                            openapi.COMPLETION_RESPONSE))
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions", **openapi.generation_route(openapi.chat_request(limits), openapi.CHAT_RESPONSE))
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models", **openapi.models_route())
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "tidal", "root": core.config.model,
                                            "max_model_len": max_model_len}]}

    @app.get("/health", **openapi.text_route("the engine is up (empty body)"))
    async def health():
        return PlainTextResponse("")

    @app.get("/metrics", **openapi.text_route("Prometheus text format"))
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine.stats(), served_model_name),
                                 media_type="text/plain; version=0.0.4")

    return app


def _fields(params: SamplingParams) -> dict:
    from dataclasses import fields
    return {f.name: getattr(params, f.name) for f in fields(params) if f.init}


async def _closing(gen, item: _Inflight):
    """Iterates ``gen``; however it ends (a client that went away included), its requests are aborted."""
    try:
        async for event in gen:
            yield event
    finally:
        for t in item.tasks:
            if not t.done():
                t.cancel()
        await gen.aclose()


# ---- running it ----------------------------------------------------------------------------------


def run_server(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, media: MediaOptions | None = None,
               limits: ServerLimits | None = None) -> None:
    """Loads the model and serves until SIGINT or SIGTERM: then stops accepting connections, aborts the
    requests in flight (their clients get finish_reason / an error), shuts the engine down and returns."""
    engine = AsyncLLMEngine.from_config(engine_config)
    name = served_model_name or os.path.basename(os.path.normpath(engine_config.model))
    engine_server(engine, name, host, port, api_key, media, limits).run()


def engine_server(engine: AsyncLLMEngine, served_model_name: str, host: str, port: int, api_key: str | None = None,
                  media: MediaOptions | None = None, limits: ServerLimits | None = None, log_level: str = "info"):
    """A uvicorn server of :func:`build_app` over ``engine`` that shuts the engine down when it stops,
    and on SIGINT / SIGTERM (or :meth:`stop`) first aborts the requests in flight."""
    import contextlib

    import uvicorn

    app = build_app(engine, served_model_name, api_key, media, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await engine.shutdown()

    app.router.lifespan_context = lifespan

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful shutdown: return normally, do not re-raise
            self.abort_all()

        def abort_all(self) -> None:
            loop = getattr(self, "_tidal_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(app.state.abort_all)

        def stop(self) -> None:
            """From another thread: abort what is in flight and stop serving."""
            self.abort_all()
            self.should_exit = True

        async def serve(self, sockets=None):
            self._tidal_loop = asyncio.get_running_loop()
            await super().serve(sockets)

    # NOTE(tidal): idle keep-alive connections live 65 s (uvicorn's default is 5 s): a client pool
    # that reuses one the server has just closed sees a connection error, which 512 streaming
    # clients on a busy CPU met (bench/load.py)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            timeout_keep_alive=65)
    return _Server(config)
