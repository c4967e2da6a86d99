"""What generation returns, with vLLM's names: RequestOutput holding one CompletionOutput per sample."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a request.

    ``finish_reason`` is None while it runs, then "stop" (EOS, a stop token or a stop string),
    "length" (max_tokens or max_model_len), "abort", or "error" (see ``RequestOutput.error``).
    ``stop_reason`` is the stop string or stop token id that ended it, if any. ``logprobs`` holds,
    per generated token, ``{token_id: logprob}`` for the sampled token and the top ones.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """What a request has produced so far: one CompletionOutput per sample.

    ``prompt_logprobs`` (with ``SamplingParams.prompt_logprobs``) has one entry per prompt token: None
    for the first, then ``{token_id: logprob}`` holding the prompt token and the most likely ones at
    that position, as ``CompletionOutput.logprobs`` does for generated tokens.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None  # why the request failed, when a sample's finish_reason is "error"
    num_cached_tokens: int = field(default=0)
    kv_transfer_params: dict | None = None  # disaggregated prefill: what a decode engine needs (finished only)
    prompt_logprobs: list[dict[int, float] | None] | None = None
