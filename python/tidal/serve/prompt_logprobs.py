"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``): which rows of a step a request needs
them for, their computation from those rows' hidden states, and where they land.

The row of prompt position ``p`` predicts the prompt token at ``p + 1``: a prompt of ``n`` tokens has
``n - 1`` entries after its first (None: nothing predicts it); the row of position ``n - 1`` is the
one the sampler reads. Rows come chunk by chunk (chunked prefill), in position order. A computation
of positions already held (after a preemption, or a sample of ``n > 1`` computing the prompt's last
block again) neither asks for logits nor adds an entry.

Only the rows of requests that asked for them are turned into logits, ``log_softmax`` in fp32, in
slices of a bounded number of rows; the step's results travel to the host in one copy.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from tidal.serve.sampler import _to_device, _to_host

# NOTE(tidal): a slice's fp32 logits, their log_softmax and top-k work take ~3 x rows x vocab x 4
# bytes: 256 rows of a 151936-token vocabulary are ~0.47 GB, the size of the sampler's own step at
# max_num_seqs=256 (which the GPU runner passes, as its profiling forward measured that many rows).
DEFAULT_ROWS_PER_SLICE = 256


class PromptLogprobs:
    """One request's prompt log-probabilities, accumulated over the steps that compute its prompt.

    ``entries[0]`` is None; ``entries[p]`` (``p >= 1``) is ``{token_id: logprob}`` holding the
    prompt token at ``p`` and the ``num_top`` most likely tokens there, the representation of
    ``CompletionOutput.logprobs``.
    """

    def __init__(self, prompt_token_ids: list[int], num_top: int):
        self.prompt_token_ids = prompt_token_ids
        self.num_top = num_top
        self.entries: list[dict[int, float] | None] = [None]

    @property
    def is_complete(self) -> bool:
        return len(self.entries) >= len(self.prompt_token_ids)

    def positions_to_compute(self, start: int, num_new: int) -> range:
        """Positions among ``[start, start + num_new)`` whose rows give entries not held yet."""
        held = len(self.entries) - 1  # rows of positions < held gave their entries
        if start > held:
            raise RuntimeError(f"prompt log-probs of positions [{held}, {start}) were never computed "
                               f"(a prompt chunk starts at {start})")
        return range(max(start, held), min(start + num_new, len(self.prompt_token_ids) - 1))

    def add(self, first: int, chosen: np.ndarray, top_ids: np.ndarray, top_values: np.ndarray) -> None:
        """Entries of the rows of positions ``first, first + 1, ...``; those held already are skipped."""
        prompt, k = self.prompt_token_ids, self.num_top
        skip = len(self.entries) - 1 - first
        if skip < 0:
            raise RuntimeError(f"prompt log-probs from position {first} would leave a gap: "
                               f"{len(self.entries) - 1} are held")
        for j in range(skip, len(chosen)):
            entry = dict(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())) if k else {}
            entry[prompt[first + j + 1]] = float(chosen[j])
            self.entries.append(entry)

    def output(self) -> list[dict[int, float] | None]:
        """What ``RequestOutput.prompt_logprobs`` shows: every entry once the prompt is computed,
        those computed so far before (a request that ended early)."""
        return self.entries if self.is_complete else list(self.entries)


@dataclass
class PromptRows:
    """The rows of one step that need prompt log-probabilities, and whose entries they are."""

    rows: np.ndarray  # int64 [num_rows]: indices into the step's tokens
    token_ids: np.ndarray  # int64 [num_rows]: the prompt token each row predicts
    num_top: int  # the most top tokens any of these requests asked for
    spans: list[tuple[PromptLogprobs, int, int]] = field(default_factory=list)  # (request, first position, rows)

    def deliver(self, result: "PromptLogprobsResult") -> None:
        """Hands each request the entries of its rows."""
        start = 0
        for state, first, count in self.spans:
            end = start + count
            state.add(first, result.chosen[start:end], result.top_ids[start:end], result.top_values[start:end])
            start = end


def plan_prompt_rows(batch, seq_ids: list[int], wanted: dict[int, PromptLogprobs]) -> PromptRows | None:
    """The rows of ``batch`` (the scheduler's step, its sequences ``seq_ids``) that the requests in
    ``wanted`` (seq id -> its request's PromptLogprobs) need; None when there are none."""
    cu, computed = batch.cu_seqlens_q, batch.num_computed_tokens
    rows, tokens, spans = [], [], []
    for i, seq_id in enumerate(seq_ids):
        state = wanted.get(seq_id)
        if state is None:
            continue
        start = int(computed[i])
        positions = state.positions_to_compute(start, int(cu[i + 1] - cu[i]))
        if not positions:
            continue
        rows.append(np.arange(positions.start, positions.stop, dtype=np.int64) + (int(cu[i]) - start))
        tokens.append(np.asarray(state.prompt_token_ids[positions.start + 1:positions.stop + 1], dtype=np.int64))
        spans.append((state, positions.start, len(positions)))
    if not spans:
        return None
    return PromptRows(np.concatenate(rows), np.concatenate(tokens), max(s.num_top for s, _, _ in spans), spans)


@dataclass
class PromptLogprobsResult:
    chosen: np.ndarray  # float64 [num_rows]: log-prob of the prompt token each row predicts
    top_ids: np.ndarray  # int64 [num_rows, num_top]
    top_values: np.ndarray  # float64 [num_rows, num_top], descending


class PendingPromptLogprobs:
    """A step's prompt log-probabilities on their way to the host; :meth:`result` waits for them."""

    def __init__(self, host: torch.Tensor, event, num_top: int):
        self._host, self._event, self._num_top = host, event, num_top

    def result(self) -> PromptLogprobsResult:
        if self._event is not None:
            self._event.synchronize()
        host, k = self._host.numpy(), self._num_top
        return PromptLogprobsResult(host[:, 0], host[:, 1:1 + k].astype(np.int64), host[:, 1 + k:])


def compute_prompt_logprobs(model, hidden: torch.Tensor, rows: PromptRows,
                            rows_per_slice: int = DEFAULT_ROWS_PER_SLICE) -> PendingPromptLogprobs:
    """Launches the prompt log-probabilities of ``rows`` from the step's ``hidden`` states
    [num_tokens, hidden_size] and queues their copy to the host.

    For each row ``r`` predicting token ``t``: ``log_softmax(logits[r])[t]`` and the ``num_top``
    largest values of ``log_softmax(logits[r])`` with their token ids, the logits widened to fp32
    (``model.compute_logits``)."""
    device = hidden.device
    index = _to_device(rows.rows, device)
    targets = _to_device(rows.token_ids, device)
    parts, k = [], rows.num_top
    for start in range(0, len(rows.rows), rows_per_slice):
        end = start + rows_per_slice
        log_probs = model.compute_logits(hidden.index_select(0, index[start:end])).float().log_softmax(dim=-1)
        k = min(k, log_probs.shape[1])
        columns = [log_probs.gather(1, targets[start:end, None]).double()]
        if k:
            top = torch.topk(log_probs, k, dim=-1)
            columns += [top.indices.double(), top.values.double()]
        parts.append(torch.cat(columns, dim=1))
        del log_probs
    host, event = _to_host(torch.cat(parts) if len(parts) > 1 else parts[0])
    return PendingPromptLogprobs(host, event, k)


def isolated_cache_keys(num_prompt_tokens: int, block_size: int, extra_keys: list[int], salt: int) -> list[int]:
    """Prefix-cache keys (one per prompt block) that no other request's blocks carry.

    NOTE(tidal): a prompt block taken from the prefix cache is not computed, so it would have no
    prompt log-probs. A request that asks for them salts its blocks' keys (the cache compares keys
    exactly): its first lookup finds nothing, and a lookup after a preemption finds only blocks this
    request computed itself, whose entries it holds. Its blocks are cached as usual, for its other
    samples (n > 1) and its own recomputation. ``salt`` is unique per request; ``extra_keys`` (a
    multimodal prompt's, or empty) are combined with it."""
    num_blocks = -(-num_prompt_tokens // block_size)
    base = extra_keys or [0] * num_blocks
    return [key ^ salt for key in base]
