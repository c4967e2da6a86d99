"""Turns the logits of the rows that need a token into tokens, one request's parameters per row.

Order, as transformers applies its logits processors: the min_tokens mask (EOS and stop tokens cannot
be drawn before min_tokens), penalties (repetition over prompt and output, frequency and presence over
the output), then greedy argmax for temperature 0, else temperature, top-k, top-p, min-p, and a draw by
the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` from :func:`tidal.ops.seeded_exponential_`:
the noise is a function of (the request's seed, how many tokens it has generated, the token id) alone,
so a request's tokens depend on its seed, never on the rest of the batch, on the CPU and the GPU.
Log-probabilities are reported from the model's raw distribution.

Everything is batched over rows (no per-row kernel launches); the per-row parameters travel to the
device in one pinned copy, and the step ends with one copy of the results back.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tidal import ops
from tidal.serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tidal.serve.prompt_logprobs import PendingPromptLogprobs, PromptLogprobsResult


@dataclass
class SequenceSampling:
    """What the sampler needs to know of one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # the noise seed; None for greedy
    # EOS and stop token ids: masked out while fewer than params.min_tokens tokens were generated
    min_tokens_blocked_ids: list[int] = field(default_factory=list)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host synchronisation (through pinned memory on CUDA)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _flat_pairs(rows: list[int], token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index per token, token id) of ``token_lists[i]`` at ``rows[i]``, as two device tensors."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    packed = np.empty((2, int(lengths.sum())), dtype=np.int64)
    packed[0] = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    packed[1] = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int64, count=packed.shape[1])
    both = _to_device(packed, device)
    return both[0], both[1]


def apply_penalties(logits: torch.Tensor, seqs: list[SequenceSampling]) -> None:
    """Penalties and the min_tokens mask, in place on ``logits`` [num_rows, vocab], batched over rows."""
    device, vocab = logits.device, logits.shape[1]
    blocked = [(r, s.min_tokens_blocked_ids) for r, s in enumerate(seqs)
               if len(s.output_token_ids) < s.params.min_tokens and s.min_tokens_blocked_ids]
    if blocked:
        rows, ids = _flat_pairs([r for r, _ in blocked], [b for _, b in blocked], device)
        logits[rows, ids] = float("-inf")
    repeated = [r for r, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if repeated:
        local, ids = _flat_pairs(list(range(len(repeated))),
                                 [seqs[r].prompt_token_ids + seqs[r].output_token_ids for r in repeated], device)
        seen = torch.zeros(len(repeated), vocab, dtype=torch.bool, device=device)
        seen[local, ids] = True
        penalty = _to_device(np.array([seqs[r].params.repetition_penalty for r in repeated], dtype=np.float32),
                             device).to(logits.dtype)[:, None]
        index = _to_device(np.asarray(repeated, dtype=np.int64), device)
        sub = logits[index]
        logits[index] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    counted = [r for r, s in enumerate(seqs)
               if (s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0) and s.output_token_ids]
    if counted:
        local, ids = _flat_pairs(list(range(len(counted))), [seqs[r].output_token_ids for r in counted], device)
        counts = torch.zeros(len(counted), vocab, dtype=logits.dtype, device=device)
        counts.index_put_((local, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True)
        coeffs = _to_device(np.array([[seqs[r].params.frequency_penalty, seqs[r].params.presence_penalty]
                                      for r in counted], dtype=np.float32), device).to(logits.dtype)
        index = _to_device(np.asarray(counted, dtype=np.int64), device)
        logits[index] -= coeffs[:, :1] * counts + coeffs[:, 1:] * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                            max_top_k: int | None = None, any_top_p: bool | None = None,
                            any_min_p: bool | None = None) -> torch.Tensor:
    """Masks (to -inf) what top-k, then top-p, then min-p remove, row by row.

    ``top_k`` int64 [rows] (vocab size when disabled), ``top_p`` and ``min_p`` float [rows].
    Matches transformers' TopK / TopP / MinP warpers, including keeping ties at the k-th value and
    always keeping the most likely token. ``max_top_k`` (the largest k below the vocabulary size, 0
    for none), ``any_top_p`` and ``any_min_p`` are what the caller knows on the host; left None they
    are read from the tensors, which synchronises with the device.
    """
    neg_inf = torch.finfo(logits.dtype).min
    vocab = logits.shape[1]
    limited = top_k < vocab
    if max_top_k is None:
        max_top_k = int(top_k[limited].max()) if bool(limited.any()) else 0
    if max_top_k > 0:
        kth = torch.topk(logits, min(max_top_k, vocab), dim=-1).values.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])
        logits = logits.masked_fill(limited[:, None] & (logits < kth), neg_inf)
    if any_top_p if any_top_p is not None else bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), neg_inf)
    if any_min_p if any_min_p is not None else bool((min_p > 0.0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or {token_id: logprob} holding the sampled token and the top-`logprobs` ones
    logprobs: list[dict[int, float] | None]
    # the step's prompt log-probs, when the runner was asked for them
    prompt_logprobs: "PromptLogprobsResult | None" = None


def _needs_processing(seq: SequenceSampling) -> bool:
    return seq.params.has_penalties or len(seq.output_token_ids) < seq.params.min_tokens


def _sample_random_rows(logits: torch.Tensor, seqs: list[SequenceSampling], rows: list[int],
                        tokens: torch.Tensor) -> None:
    """Writes the draws of the non-greedy ``rows`` into ``tokens``."""
    device, vocab = logits.device, logits.shape[1]
    params = [seqs[i].params for i in rows]
    floats = np.array([[p.temperature, p.top_p, p.min_p] for p in params], dtype=np.float32)
    ints = np.array([[rows[j], p.top_k if p.top_k > 0 else vocab, seqs[i].seed, len(seqs[i].output_token_ids)]
                     for j, (i, p) in enumerate(zip(rows, params))], dtype=np.int64)
    floats_d, ints_d = _to_device(floats, device), _to_device(ints, device)
    index = ints_d[:, 0]
    sub = logits[index] / floats_d[:, :1].to(logits.dtype)
    max_top_k = max((p.top_k for p in params if 0 < p.top_k < vocab), default=0)
    sub = apply_top_k_top_p_min_p(sub, ints_d[:, 1], floats_d[:, 1].to(logits.dtype), floats_d[:, 2].to(logits.dtype),
                                  max_top_k=max_top_k, any_top_p=any(p.top_p < 1.0 for p in params),
                                  any_min_p=any(p.min_p > 0.0 for p in params))
    probs = sub.float().softmax(dim=-1)
    noise = ops.seeded_exponential_(torch.empty_like(probs), ints_d[:, 2].contiguous(), ints_d[:, 3].contiguous())
    tokens[index] = (probs / noise).argmax(dim=-1)


class PendingSample:
    """A step's sampled tokens (and log-probs) on their way to the host: the kernels are launched and
    the copy is queued; :meth:`result` waits for it. The engine does the previous step's bookkeeping
    in between, so the host and the GPU overlap."""

    def __init__(self, host: torch.Tensor, event, seqs: list[SequenceSampling], wanted: list[int], top_k: int):
        self._host, self._event, self._seqs, self._wanted, self._top_k = host, event, seqs, wanted, top_k
        self.prompt_logprobs: "PendingPromptLogprobs | None" = None  # attached by the runner
        # the sampled ids where they were drawn (int64 [num_rows]): asynchronous scheduling feeds
        # them to the next step's inputs without a round trip through the host
        self.tokens: torch.Tensor | None = None

    @classmethod
    def of_prompt_logprobs(cls, prompt_logprobs: "PendingPromptLogprobs") -> "PendingSample":
        """A step that samples no row but computed prompt log-probs."""
        pending = cls(torch.empty(0, dtype=torch.float64), None, [], [], 0)
        pending.prompt_logprobs = prompt_logprobs
        return pending

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        prompt = None if self.prompt_logprobs is None else self.prompt_logprobs.result()
        host, seqs, wanted = self._host.numpy(), self._seqs, self._wanted
        n, w, kk = len(seqs), len(wanted), self._top_k
        token_list = host[:n].astype(np.int64).tolist()
        logprobs: list[dict[int, float] | None] = [None] * n
        if not wanted:
            return SampleResult(token_list, logprobs, prompt)
        chosen = host[n:n + w]
        top_ids = host[n + w:n + w + w * kk].astype(np.int64).reshape(w, kk)
        top_vals = host[n + w + w * kk:].reshape(w, kk)
        for j, i in enumerate(wanted):
            want_k = seqs[i].params.logprobs
            entry = {int(t): float(v) for t, v in zip(top_ids[j, :want_k], top_vals[j, :want_k])} if want_k else {}
            entry[token_list[i]] = float(chosen[j])
            logprobs[i] = entry
        return SampleResult(token_list, logprobs, prompt)


def _to_host(packed: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A non-blocking copy to pinned memory and the event that marks its end (CPU: the tensor)."""
    if packed.device.type != "cuda":
        return packed, None
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def sample_async(logits: torch.Tensor, seqs: list[SequenceSampling]) -> PendingSample:
    """One token per row of ``logits`` [num_rows, vocab] (float32, or the model's dtype: widened to
    float32 unless every row is a plain greedy one), following each row's params.

    Launches everything without waiting on the device and queues one copy of the tokens (and the
    log-probs that rows asked for) back; ``.result()`` waits for it."""
    random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
    processing = any(_needs_processing(s) for s in seqs)
    if logits.dtype != torch.float32 and (processing or random_rows or any(s.params.logprobs is not None for s in seqs)):
        logits = logits.float()  # a greedy-only step takes the argmax of the logits as they are
    raw = logits
    if processing:
        logits = logits.clone()
        apply_penalties(logits, seqs)
    tokens = logits.argmax(dim=-1)
    if random_rows:
        _sample_random_rows(logits, seqs, random_rows, tokens)

    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not wanted:
        host, event = _to_host(tokens)
        pending = PendingSample(host, event, seqs, wanted, 0)
        pending.tokens = tokens
        return pending
    index = _to_device(np.asarray(wanted, dtype=np.int64), raw.device)
    log_probs = raw[index].float().log_softmax(dim=-1)
    k = max(seqs[i].params.logprobs for i in wanted)
    top = torch.topk(log_probs, min(max(k, 1), log_probs.shape[1]))
    chosen = log_probs.gather(1, tokens[index][:, None])[:, 0]
    # One copy back: tokens, then per wanted row its chosen logprob, top ids and top values.
    packed = torch.cat((tokens.double(), chosen.double(), top.indices.double().flatten(), top.values.double().flatten()))
    host, event = _to_host(packed)
    pending = PendingSample(host, event, seqs, wanted, top.indices.shape[1])
    pending.tokens = tokens
    return pending


def sample(logits: torch.Tensor, seqs: list[SequenceSampling]) -> SampleResult:
    """:func:`sample_async` and wait for it."""
    return sample_async(logits, seqs).result()
