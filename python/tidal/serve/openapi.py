"""The OpenAPI description of the server's endpoints: request and response bodies as JSON Schema.

The handlers parse bodies themselves (so every error is an OpenAI-shaped 400 naming the field); these
schemas only describe them, at ``GET /openapi.json``, for clients and for schema-driven fuzzing
(tests/server/test_schemathesis.py). They are no stricter than the handlers: a body the schema
rejects, the server rejects too; sizes the server bounds (``n``, ``logprobs``, stop strings) carry
the bounds of the server's limits.
"""

from __future__ import annotations

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_NULLABLE_STR = {"type": ["string", "null"]}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": _NULLABLE_STR, "code": _NULLABLE_STR}}},
}

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT}}
_FINISH = {"type": ["string", "null"]}


def _nullable(schema: dict) -> dict:
    """``schema`` or null: the handlers read a null optional field as absent."""
    if "oneOf" in schema:
        return {"oneOf": [*schema["oneOf"], {"type": "null"}]}
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": kinds if "null" in kinds else [*kinds, "null"]}


#: Optional fields a null does not stand for "absent" in: the handlers reject ``"stream": null``.
_NOT_NULLABLE = {"stream"}


def _sampling(limits) -> dict:
    """The sampling fields completions and chat share."""
    return {name: schema if name in _NOT_NULLABLE else _nullable(schema)
            for name, schema in _sampling_fields(limits).items()}


def _sampling_fields(limits) -> dict:
    stop_item = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_length}
    return {
        "model": {"type": "string"}, "stream": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT, "min_p": _NUMBER, "seed": {"type": ["integer", "null"]},
        "min_tokens": _INT, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "repetition_penalty": _NUMBER,
        "stop": {"oneOf": [stop_item, {"type": "array", "items": stop_item, "maxItems": limits.max_stop_strings}]},
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "ignore_eos": {"type": "boolean"}, "include_stop_str_in_output": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    }


def completion_request(limits) -> dict:
    prompt = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}
    return {"type": "object", "required": ["prompt"], "properties": {
        **_sampling(limits), "prompt": prompt,
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_logprobs},
        "prompt_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_logprobs}}}


def chat_request(limits) -> dict:
    part = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": part}]}}}
    return {"type": "object", "required": ["messages"], "properties": {
        **_sampling(limits), "messages": {"type": "array", "items": message, "minItems": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_logprobs}}}


COMPLETION_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
                           "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": _INT,
                           "model": {"type": "string"}, "usage": _USAGE,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "text", "finish_reason"], "properties": {
                                   "index": _INT, "text": {"type": "string"}, "finish_reason": _FINISH,
                                   "prompt_logprobs": {"type": "array", "items": {"type": ["object", "null"]}}}}}}}
CHAT_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                 "properties": {
                     "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": _INT,
                     "model": {"type": "string"}, "usage": _USAGE,
                     "choices": {"type": "array", "items": {
                         "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
                             "index": _INT, "finish_reason": _FINISH,
                             "message": {"type": "object", "required": ["role", "content"], "properties": {
                                 "role": {"const": "assistant"}, "content": {"type": "string"}}}}}}}}
MODELS_RESPONSE = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object"], "properties": {"id": {"type": "string"}}}}}}


def _errors(*codes: int) -> dict:
    text = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model", 413: "body too large",
            429: "too many requests in flight (see Retry-After)", 500: "generation failed",
            503: "shutting down"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def generation_route(request_schema: dict, response_schema: dict) -> dict:
    """The ``openapi_extra`` / ``responses`` keyword arguments of a completions-style route."""
    return dict(
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": request_schema}}}},
        responses={"200": {"description": "the completion, or server-sent events with stream=true",
                           "content": {"application/json": {"schema": response_schema},
                                       "text/event-stream": {"schema": {"type": "string"}}}},
                   **_errors(400, 401, 404, 413, 429, 500, 503)})


def models_route() -> dict:
    return dict(responses={"200": {"description": "the served model",
                                   "content": {"application/json": {"schema": MODELS_RESPONSE}}},
                           **_errors(401)})


def text_route(description: str) -> dict:
    """A route answering plain text (``/health``, ``/metrics``)."""
    return dict(responses={"200": {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}})
