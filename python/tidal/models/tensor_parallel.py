"""Tensor parallelism for the Llama-family decoder (Megatron's split, vLLM's ``tensor_parallel_size``):
each rank of a process group keeps a slice of every projection and the model's outputs are the same
on every rank.

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: a rank keeps its query heads, the KV heads they
  read (a slice of them, or one head replicated when there are fewer KV heads than ranks), and its
  share of the intermediate size; nothing is exchanged after them.
- ``o_proj`` and ``down_proj`` are row-parallel: a rank multiplies its slice of the inputs and one
  all-reduce sums the partial outputs (the bias added once, after it).
- the embedding and the LM head are vocab-parallel: a rank keeps a contiguous range of the vocabulary
  (the vocabulary padded to a multiple of the ranks); a token outside the range embeds to zeros before
  an all-reduce, and the ranks' logits are gathered along the vocabulary.

A rank's KV cache holds only its KV heads (``model.num_kv_heads`` after :func:`shard_`), so the cache
of each GPU shrinks with the ranks as the weights do. The collectives run over
``torch.distributed`` (Gloo on the CPU, NCCL on GPUs) through :class:`TensorParallelGroup`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tidal.models.llama import LlamaForCausalLM, LlamaMLP


class TensorParallelGroup:
    """The ranks that split one model: ``rank`` of ``size`` over ``group``, a torch.distributed
    process group object (``torch.distributed.ProcessGroupGloo`` on the CPU), used directly so that
    an engine's group lives beside whatever default group the process has. ``driver``: on the rank
    that runs the engine, what tells the other ranks to follow each step (tidal.serve.tensor_parallel)."""

    def __init__(self, rank: int, size: int, group=None):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank={rank} must be in [0, size={size})")
        if size > 1 and group is None:
            raise ValueError(f"size={size} ranks need a process group")
        self.rank, self.size, self.group = rank, size, group
        self.driver = None

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place (fp32 on the wire for 16-bit ``x`` on the CPU, where
        Gloo has no 16-bit sum)."""
        if self.size == 1:
            return x
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            wide = x.float()
            self.group.allreduce([wide]).wait()
            return x.copy_(wide)
        buffer = x if x.is_contiguous() else x.contiguous()
        self.group.allreduce([buffer]).wait()
        return x if buffer is x else x.copy_(buffer)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' ``x`` (equal shapes) concatenated along ``dim`` in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` (contiguous) overwritten with rank ``src``'s."""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self.group.broadcast([x], opts).wait()
        return x


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r^T) + b``: this rank's columns of the weight (its slice of the inputs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallelGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce_(x @ self.weight.t())
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + weight.shape[0])`` of the embedding; other tokens embed to zeros on this
    rank and the all-reduce fills them in from their own."""

    def __init__(self, weight: nn.Parameter, start: int, tp: TensorParallelGroup):
        super().__init__()
        self.weight = weight
        self.start, self.tp = start, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = nn.functional.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        out.mul_(inside.unsqueeze(-1).to(out.dtype))
        return self.tp.all_reduce_(out)


def _column_linear(weight: torch.Tensor, bias: torch.Tensor | None, spans: list[tuple[int, int]]) -> nn.Linear:
    """A plain linear layer of the rows ``spans`` of ``weight`` (and ``bias``)."""
    w = torch.cat([weight[a:b] for a, b in spans])
    linear = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype,
                                device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(torch.cat([bias[a:b] for a, b in spans]))
    linear.requires_grad_(False)
    return linear


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """The KV heads ``[first, first + count)`` rank ``rank`` of ``size`` keeps: its share when there
    are at least as many KV heads as ranks, else the one head its query heads read (replicated)."""
    if num_kv_heads >= size:
        count = num_kv_heads // size
        return rank * count, count
    heads_per_rank = num_heads // size
    return rank * heads_per_rank * num_kv_heads // num_heads, 1


def check_config_shardable(cfg, size: int) -> None:
    """Raises ValueError naming what keeps a model of ``cfg`` (a ModelConfig) from splitting over
    ``size`` ranks."""
    if cfg.multimodal_architecture is not None:
        raise ValueError(f"tensor_parallel_size={size}: {cfg.multimodal_architecture} (vision-language) does not "
                         f"split across ranks yet")
    if cfg.num_experts:
        raise ValueError(f"tensor_parallel_size={size}: mixture-of-experts layers do not split across ranks yet")
    for name, value in (("num_attention_heads", cfg.num_attention_heads),
                        ("intermediate_size", cfg.intermediate_size)):
        if value % size:
            raise ValueError(f"tensor_parallel_size={size} must divide {name}={value}")
    kv = cfg.num_key_value_heads
    if kv >= size and kv % size:
        raise ValueError(f"tensor_parallel_size={size} must divide num_key_value_heads={kv} (or be a multiple of it)")
    if kv < size and size % kv:
        raise ValueError(f"tensor_parallel_size={size} must be a multiple of num_key_value_heads={kv}")


def check_shardable(model: nn.Module, size: int) -> None:
    """Raises ValueError naming what keeps ``model`` from splitting over ``size`` ranks."""
    if type(model) is not LlamaForCausalLM:
        raise ValueError(f"tensor_parallel_size={size}: only Llama-family decoders split across ranks, "
                         f"not {type(model).__name__}")
    check_config_shardable(model.config, size)
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, LlamaMLP):
            raise ValueError(f"tensor_parallel_size={size}: layer {i} is a mixture of experts, which does not "
                             f"split across ranks yet")
        for name, linear in (("qkv_proj", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                             ("gate_up_proj", layer.mlp.gate_up_proj), ("down_proj", layer.mlp.down_proj)):
            if type(linear) is not nn.Linear:
                raise ValueError(f"tensor_parallel_size={size}: layer {i}'s {name} is a "
                                 f"{type(linear).__name__}; quantized layers do not split across ranks yet")


@torch.no_grad()
def shard_(model: LlamaForCausalLM, tp: TensorParallelGroup) -> LlamaForCausalLM:
    """Turns a whole loaded model into rank ``tp.rank``'s slice, in place, and returns it."""
    check_shardable(model, tp.size)
    if tp.size == 1:
        return model
    cfg, r, n = model.config, tp.rank, tp.size
    hd = cfg.head_dim
    q_heads = cfg.num_attention_heads // n
    kv_first, kv_count = kv_heads_of_rank(cfg.num_attention_heads, cfg.num_key_value_heads, r, n)
    q_size, kv_size = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    inter = cfg.intermediate_size // n
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_span = (r * q_heads * hd, (r + 1) * q_heads * hd)
        k_span = (q_size + kv_first * hd, q_size + (kv_first + kv_count) * hd)
        v_span = (q_size + kv_size + kv_first * hd, q_size + kv_size + (kv_first + kv_count) * hd)
        attn.qkv_proj = _column_linear(attn.qkv_proj.weight, attn.qkv_proj.bias, [q_span, k_span, v_span])
        attn.o_proj = RowParallelLinear(attn.o_proj.weight[:, q_span[0]:q_span[1]].clone(),
                                        attn.o_proj.bias, tp)
        attn.num_heads, attn.num_kv_heads = q_heads, kv_count
        attn.q_size, attn.kv_size = q_heads * hd, kv_count * hd
        full = cfg.intermediate_size
        mlp.gate_up_proj = _column_linear(mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                                          [(r * inter, (r + 1) * inter), (full + r * inter, full + (r + 1) * inter)])
        mlp.down_proj = RowParallelLinear(mlp.down_proj.weight[:, r * inter:(r + 1) * inter].clone(),
                                          mlp.down_proj.bias, tp)
        layer.skinny_ok = False  # the fused GPU path adds into the residual before any all-reduce
    # the vocabulary: padded to a multiple of the ranks, a contiguous range each
    vocab = cfg.vocab_size
    per_rank = -(-vocab // n)
    start, stop = r * per_rank, min((r + 1) * per_rank, vocab)

    def vocab_rows(t: torch.Tensor) -> nn.Parameter:  # this rank's rows of a weight (or bias) over the vocabulary
        rows = t.new_zeros(per_rank, *t.shape[1:])
        rows[: max(stop - start, 0)] = t[start:stop]
        return nn.Parameter(rows, requires_grad=False)

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    embed = vocab_rows(model.model.embed_tokens.weight)
    model.model.embed_tokens = VocabParallelEmbedding(embed, start, tp)
    model.lm_head.weight = embed if tied else vocab_rows(model.lm_head.weight)
    model.lm_head.out_features = per_rank
    if model.lm_head.bias is not None:
        model.lm_head.bias = vocab_rows(model.lm_head.bias)
    model.num_heads, model.num_kv_heads = q_heads, kv_count
    model.tp = tp
    return model
