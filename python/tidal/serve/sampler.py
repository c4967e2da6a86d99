"""Turns the logits of the rows that need a token into tokens, one request's parameters per row.

Order, as transformers applies its logits processors: the min_tokens mask (EOS and stop tokens cannot
be drawn before min_tokens), penalties (repetition over prompt and output, frequency and presence over
the output), then greedy argmax for temperature 0, else temperature,
top-k, top-p, min-p, and a draw from the request's own generator (an exponential race, so a
request's tokens depend on its seed alone, never on the rest of the batch). Log-probabilities are
reported from the model's raw distribution.
"""

from dataclasses import dataclass, field

import torch

from tidal.serve.sampling_params import SamplingParams


@dataclass
class SequenceSampling:
    """What the sampler needs to know of one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # None for greedy
    # EOS and stop token ids: masked out while fewer than params.min_tokens tokens were generated
    min_tokens_blocked_ids: list[int] = field(default_factory=list)


def _needs_processing(seq: SequenceSampling) -> bool:
    return seq.params.has_penalties or len(seq.output_token_ids) < seq.params.min_tokens


def apply_penalties(logits: torch.Tensor, seqs: list[SequenceSampling]) -> None:
    """Penalties and the min_tokens mask, in place on ``logits`` [num_rows, vocab]."""
    vocab = logits.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if len(seq.output_token_ids) < p.min_tokens and seq.min_tokens_blocked_ids:
            logits[row, seq.min_tokens_blocked_ids] = float("-inf")
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_token_ids + seq.output_token_ids, dtype=torch.long, device=logits.device)
            seen = seen.unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Masks (to -inf) what top-k, then top-p, then min-p remove, row by row.

    ``top_k`` int64 [rows] (vocab size when disabled), ``top_p`` and ``min_p`` float [rows].
    Matches transformers' TopK / TopP / MinP warpers, including keeping ties at the k-th value and
    always keeping the most likely token.
    """
    neg_inf = torch.finfo(logits.dtype).min
    vocab = logits.shape[1]
    limited = top_k < vocab
    if bool(limited.any()):
        rows = limited.nonzero().squeeze(1)
        k = top_k[rows]
        kth = torch.topk(logits[rows], int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.clone()
        logits[rows] = logits[rows].masked_fill(logits[rows] < kth, neg_inf)
    if bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), neg_inf)
    if bool((min_p > 0.0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or {token_id: logprob} holding the sampled token and the top-`logprobs` ones
    logprobs: list[dict[int, float] | None]


def sample(logits: torch.Tensor, seqs: list[SequenceSampling]) -> SampleResult:
    """One token per row of ``logits`` [num_rows, vocab] (float32), following each row's params."""
    raw = logits
    logits = logits.clone() if any(_needs_processing(s) for s in seqs) else logits
    apply_penalties(logits, seqs)

    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        params = [seqs[i].params for i in random_rows]
        vocab = logits.shape[1]
        sub = logits[rows] / torch.tensor([p.temperature for p in params], dtype=logits.dtype,
                                          device=logits.device)[:, None]
        sub = apply_top_k_top_p_min_p(
            sub,
            torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device),
            torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device),
            torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=logits.device),
        )
        probs = sub.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each row uses its own generator.
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            noise[j].exponential_(generator=seqs[i].generator)
        tokens[rows] = (probs / noise).argmax(dim=-1)

    token_list = tokens.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, dtype=torch.long, device=logits.device)
        log_probs = raw[rows].float().log_softmax(dim=-1)
        for j, i in enumerate(wanted):
            k = seqs[i].params.logprobs
            entry = {}
            if k:
                top = torch.topk(log_probs[j], min(k, log_probs.shape[1]))
                entry = dict(zip(top.indices.tolist(), top.values.tolist()))
            entry[token_list[i]] = float(log_probs[j, token_list[i]])
            logprobs[i] = entry
    return SampleResult(token_list, logprobs)
