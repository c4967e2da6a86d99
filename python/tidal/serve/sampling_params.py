"""SamplingParams: how one request is decoded, with vLLM's names and defaults.

Every field is checked when the object is made; a bad value is a ValueError that names the
parameter and the value.
"""

from dataclasses import dataclass, field


_INT32, _INT64 = 1 << 31, 1 << 63


@dataclass
class SamplingParams:
    """Decoding parameters of one request.

    Parameters
    ----------
    n : int
        Number of completions for the prompt; they share the prompt's KV blocks.
    temperature : float
        0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_p, top_k, min_p : float, int, float
        Nucleus mass in (0, 1]; number of most likely tokens kept (-1: all); minimum probability
        relative to the most likely token in [0, 1].
    seed : int or None
        Seeds this request's own generator: its samples do not depend on the rest of the batch.
    max_tokens, min_tokens : int
        Most and fewest tokens to generate: before min_tokens, EOS and stop tokens cannot be drawn.
    stop : str or list of str
        Generation stops when the text contains one of these; it is not included in the text
        unless ``include_stop_str_in_output``.
    stop_token_ids : list of int
        Token ids that end generation (the token is kept in ``token_ids``).
    ignore_eos : bool
        Keep generating past EOS (benchmarks).
    logprobs : int or None
        Return the log-probabilities of the sampled token and the ``logprobs`` most likely tokens
        at each position (from the model's raw distribution).
    prompt_logprobs : int or None
        Return, for every prompt token after the first, its log-probability given the tokens before
        it and the ``prompt_logprobs`` most likely tokens at that position (0: the prompt token
        alone), as ``RequestOutput.prompt_logprobs``. Such a request computes its whole prompt:
        it takes no prompt blocks from the prefix cache that other requests computed.
    presence_penalty, frequency_penalty : float
        Subtracted from the logits of tokens already generated: once, or once per occurrence.
        In [-2, 2].
    repetition_penalty : float
        > 0; logits of tokens in the prompt or output are divided by it when positive and
        multiplied when negative (1 disables).
    skip_special_tokens : bool
        Leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, value, rule: str) -> ValueError:
            return ValueError(f"{name}={value!r} {rule}")

        # NOTE(tidal): counts and ids reach the scheduler as 32-bit ints and seeds the sampler as
        # 64-bit ones: larger values are errors here, not overflows inside a step (which would fail
        # every request of that step).
        if not isinstance(self.n, int) or not 1 <= self.n < _INT32:
            raise bad("n", self.n, "must be an integer in [1, 2**31)")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise bad("temperature", self.temperature, "must be finite and >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k == 0 or not -1 <= self.top_k < _INT32:
            raise bad("top_k", self.top_k, "must be -1 (disabled) or an integer in [1, 2**31)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not -_INT64 <= self.seed < _INT64):
            raise bad("seed", self.seed, "must be None or an integer in [-2**63, 2**63)")
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < _INT32:
            raise bad("max_tokens", self.max_tokens, "must be an integer in [1, 2**31)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must be <= max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, value, "must be None or an integer >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(name, value, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0 or self.repetition_penalty == float("inf"):
            raise bad("repetition_penalty", self.repetition_penalty, "must be finite and > 0")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        ids = self.stop_token_ids or []
        if any(not isinstance(t, int) or not 0 <= t < _INT32 for t in ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids in [0, 2**31)")
        self.stop_token_ids = list(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
