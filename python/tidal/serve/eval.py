"""Perplexity of a served model on a text, from the prompt log-probabilities the engine computes
(``SamplingParams(prompt_logprobs=0)``): what ``tidal eval-ppl`` prints and benchmarks call.

The token ids are cut into windows of at most ``context`` tokens, each starting ``stride`` tokens
after the one before (``stride == context``: disjoint windows). Each window is one request; a token
is scored once, by the first window that predicts it with the tokens before it in that window as
context, so the first token of the text is never scored and, with disjoint windows, neither is the
first token of any window.
"""

import math
from dataclasses import dataclass

from tidal.serve.sampling_params import SamplingParams


@dataclass
class Perplexity:
    """``perplexity = exp(nll)``, ``nll`` the mean negative log-likelihood (nats) of the
    ``num_tokens`` scored tokens, over ``num_windows`` windows."""

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int


def windows(num_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` of each window of a text of ``num_tokens`` tokens: the window
    holds tokens ``[start, end)`` and scores ``[first_scored, end)``.

    Parameters
    ----------
    num_tokens : int
        Tokens of the text, >= 2.
    context : int
        Most tokens in one window, >= 2.
    stride : int or None
        Tokens between the starts of consecutive windows, in [1, context]; None means ``context``.
    """
    stride = context if stride is None else stride
    if not isinstance(num_tokens, int) or num_tokens < 2:
        raise ValueError(f"num_tokens={num_tokens!r}: the text must hold at least 2 tokens to score one")
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context={context!r} must be an integer >= 2")
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride={stride!r} must be an integer in [1, context={context}]")
    out, scored_to = [], 1
    for start in range(0, num_tokens, stride):
        end = min(start + context, num_tokens)
        out.append((start, end, max(start + 1, scored_to)))
        scored_to = end
        if end == num_tokens:
            break
    return out


def perplexity(llm, text: str | list[int], context: int | None = None, stride: int | None = None,
               windows_per_call: int | None = None) -> Perplexity:
    """Perplexity of ``llm``'s model on ``text``.

    ``nll = -(1 / N) * sum_i log p(x_i | x_{s(i)}, ..., x_{i-1})`` over the ``N`` scored tokens,
    ``s(i)`` the start of the window that scores ``x_i`` (see :func:`windows`); the log-probs are
    ``log_softmax`` of the model's fp32 logits, computed by the engine over each window as a prompt.

    Parameters
    ----------
    llm : tidal.LLM
        The served model.
    text : str or list of int
        The text, tokenized as the model's tokenizer does a prompt (special tokens such as a BOS
        included), or token ids.
    context : int or None
        Most tokens in one window; None means ``max_model_len - 1`` (a prompt plus the one token
        each request generates fits ``max_model_len``).
    stride : int or None
        Tokens between the starts of consecutive windows, in [1, context]; None means ``context``.
    windows_per_call : int or None
        Windows handed to one ``llm.generate`` call (their outputs are held together); None means
        the engine's ``max_num_seqs``.

    Returns
    -------
    Perplexity
    """
    engine = llm.engine
    if isinstance(text, str):
        if engine.tokenizer is None:
            raise ValueError("text is a string but the model has no tokenizer.json; pass token ids")
        ids = engine.tokenizer.encode(text)
    else:
        ids = [int(t) for t in text]
    max_context = engine.max_model_len - 1
    context = max_context if context is None else context
    if isinstance(context, int) and context > max_context:
        raise ValueError(f"context={context} must be <= max_model_len - 1 = {max_context}")
    spans = windows(len(ids), context, stride)
    group = engine.config.max_num_seqs if windows_per_call is None else windows_per_call
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"windows_per_call={windows_per_call!r} must be None or an integer >= 1")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    total, count = 0.0, 0
    for g in range(0, len(spans), group):
        part = spans[g:g + group]
        outputs = llm.generate([ids[s:e] for s, e, _ in part], params, use_tqdm=False)
        for (start, end, first), out in zip(part, outputs):
            if out.error:
                raise RuntimeError(f"the window of tokens [{start}, {end}) failed: {out.error}")
            entries = out.prompt_logprobs
            for p in range(first, end):
                total -= entries[p - start][ids[p]]
            count += end - first
    nll = total / count
    return Perplexity(math.exp(nll) if nll < 700 else math.inf, nll, count, len(spans))
