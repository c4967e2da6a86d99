"""What GRPOTrainer and PPOTrainer share: the serving engine over the policy being trained, scoring
completions, the log-probabilities of a batch's next tokens under a training forward and under the
serving engine (and their check against each other), and the per-step training loop."""

import os
import time
from collections.abc import Callable

import torch

from tidal.rlhf import losses


class ServedPolicy:
    """``tidal.LLM`` over the policy a training engine holds. At ZeRO stage 0-2 it serves the
    engine's module itself: the parameters are shared and a step's update is what the next rollout
    reads. At stage 3 the module's parameters exist only while gathered, so it serves a full copy
    that :meth:`sync` refreshes module by module as each module's parameters are gathered.

    With ``release_kv_cache`` the serving engine sleeps between rollouts: its KV cache's memory is
    free for the training step and taken back (at the same device address, so the CUDA graphs hold)
    by the next :meth:`generate`."""

    def __init__(self, engine, model_dir: str, tokenizer: str | None, llm_kwargs: dict,
                 release_kv_cache: bool = True):
        import tidal
        from tidal.models import load_model

        self.engine, self.copy = engine, None
        self.release_kv_cache = release_kv_cache
        served = engine.module
        if engine.stage == 3:
            self.copy, _ = load_model(model_dir, device=engine.device)
            self.copy.requires_grad_(False)
            engine.copy_weights_to(self.copy)
            served = self.copy
        if tokenizer is None and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
            tokenizer = model_dir  # else prompts and completions are token ids
        self.llm = tidal.LLM(served, tokenizer=tokenizer, **llm_kwargs)
        self.wake_up_s = self.sleep_s = 0.0
        if release_kv_cache:
            self._sleep()

    def _sleep(self) -> None:
        t0 = time.perf_counter()
        self.llm.sleep()
        self.sleep_s = time.perf_counter() - t0

    def generate(self, prompts: list, params: list) -> list:
        """``LLM.generate`` over the current weights, the KV cache taken for it and given back after."""
        if self.llm.is_sleeping:
            t0 = time.perf_counter()
            self.llm.wake_up()
            self.wake_up_s = time.perf_counter() - t0
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.release_kv_cache:
            self._sleep()
        return outputs

    def sync(self) -> None:
        """After a training step (collective at stage 3): the serving weights are the new ones."""
        if self.copy is not None:
            self.engine.copy_weights_to(self.copy)
        self.llm.weights_updated()


def reward_functions(reward_funcs, reward_model) -> list[Callable]:
    """The reward functions as a list, after checking that exactly one source of reward is given."""
    if (reward_funcs is None) == (reward_model is None):
        raise ValueError("give exactly one of reward_funcs and reward_model")
    if reward_funcs is None:
        return []
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs or not all(callable(f) for f in funcs):
        raise ValueError("reward_funcs must be a callable or a non-empty list of callables")
    return funcs


def score(reward_funcs: list[Callable], prompts: list, completions: list, completion_ids: list[list[int]],
          reward_model=None, ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of every reward function's scores, or ``reward_model``'s scores of the ``ids`` rows
    (``lengths`` tokens each): float64 on the CPU, one per completion."""
    if reward_model is not None:
        with torch.no_grad():
            return reward_model(ids, lengths).double().cpu()
    total = torch.zeros(len(completions), dtype=torch.float64)
    for func in reward_funcs:
        scores = list(func(prompts=prompts, completions=completions, completion_ids=completion_ids))
        if len(scores) != len(completions):
            raise ValueError(f"reward function {getattr(func, '__name__', func)!r} returned {len(scores)} "
                             f"scores for {len(completions)} completions")
        total += torch.tensor(scores, dtype=torch.float64)
    return total


def batch(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion`` rows and the mask of the positions that predict a
    completion token (position ``len(prompt) - 1 + j`` predicts completion token j)."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    ids = torch.zeros(len(prompt_ids), width, dtype=torch.int64)
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.int64)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, len(p) - 1:len(p) - 1 + len(c)] = 1
    return ids, mask


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token of ``ids`` under ``logits`` ``[batch, T, vocab]`` (column t
    predicts token t + 1; the last column is padding), at ``temperature``."""
    logp = losses.sequence_logprobs(logits[:, :-1], ids[:, 1:], temperature)
    return torch.cat((logp, logp.new_zeros(logp.shape[0], 1)), dim=1)


def next_token_logprobs(model, ids: torch.Tensor, temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """:func:`logprobs_from_logits` of ``model``'s training forward over ``ids``, ``chunk`` rows at a
    time when given (the logits of a whole batch over a large vocabulary need not fit at once)."""
    if chunk is None or chunk >= ids.shape[0]:
        return logprobs_from_logits(model(ids), ids, temperature)
    return torch.cat([logprobs_from_logits(model(ids[lo:lo + chunk]), ids[lo:lo + chunk], temperature)
                      for lo in range(0, ids.shape[0], chunk)])


def serving_logprobs(prompt_ids: list[list[int]], completions: list, shape: tuple) -> torch.Tensor:
    """The serving engine's log-probabilities of the sampled tokens (``logprobs=0`` outputs), laid out
    as :func:`batch`'s mask."""
    out = torch.zeros(shape, dtype=torch.float32)
    for row, (p, c) in enumerate(zip(prompt_ids, completions)):
        for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            out[row, len(p) - 1 + j] = entry[token]
    return out


def check_logprobs(serving: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor, tolerance: float) -> float:
    """The largest gap between the two on the masked positions; RuntimeError above ``tolerance``."""
    error = float(((serving.to(trained.device) - trained).abs() * mask).max())
    if error > tolerance:
        raise RuntimeError(f"the serving engine's log-probabilities differ from the training forward's by "
                           f"{error:.3g} (logprob_tolerance={tolerance})")
    return error


def train_loop(step: Callable[[list], dict], prompts: list, steps: int, line: Callable[[dict], str],
               log: Callable[[str], None] | None) -> list[dict]:
    """``steps`` calls of ``step(prompts)``; ``log(line(metrics))`` after each; every step's metrics."""
    history = []
    for _ in range(steps):
        history.append(step(prompts))
        if log is not None:
            log(line(history[-1]))
    return history
