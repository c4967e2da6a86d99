"""Tensor parallelism for the Llama-family decoder (Megatron's split, vLLM's ``tensor_parallel_size``):
each rank of a process group keeps a slice of every projection and the model's outputs are the same
on every rank.

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: a rank keeps its query heads, the KV heads they
  read (a slice of them, or one head replicated when there are fewer KV heads than ranks), and its
  share of the intermediate size; nothing is exchanged after them.
- ``o_proj`` and ``down_proj`` are row-parallel: a rank multiplies its slice of the inputs and one
  all-reduce sums the partial outputs (the bias added once, after it).
- a mixture-of-experts block splits every expert the same way (each expert's gate/up rows and
  down columns over its intermediate size, the shared expert likewise); the router stays whole, so
  every rank routes each token to the same experts, and one all-reduce sums the block's output.
- quantized projections (tidal.quant.QuantLinear, int8/int4/FP8) split as their dense twins: their
  codes, scales and zero points by output rows, or by inputs on group boundaries.
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
from tidal.models.moe import SharedExpert, SparseMoeBlock
from tidal.ops.quant import FP8_MAX
from tidal.quant.linear import QuantLinear


class TensorParallelGroup:
    """The ranks that split one model: ``rank`` of ``size`` over ``group``, a torch.distributed
    process group object (``torch.distributed.ProcessGroupGloo``: CPU tensors, or CUDA tensors staged
    through the host), used directly so that an engine's group lives beside whatever default group
    the process has; or over ``comm``, a :class:`tidal.comm.Communicator` on NCCL, whose collectives
    are enqueued on the current CUDA stream (so a CUDA graph captures them). ``driver``: on the rank
    that runs the engine, what tells the other ranks to follow each step (tidal.serve.tensor_parallel)."""

    def __init__(self, rank: int, size: int, group=None, comm=None):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank={rank} must be in [0, size={size})")
        if size > 1 and group is None and comm is None:
            raise ValueError(f"size={size} ranks need a process group")
        self.rank, self.size, self.group, self.comm = rank, size, group, comm
        self.driver = None

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place (fp32 on the wire for 16-bit ``x`` over Gloo, which has
        no 16-bit sum)."""
        if self.size == 1:
            return x
        if self.comm is not None:
            buffer = x if x.is_contiguous() else x.contiguous()
            self.comm.all_reduce_(buffer)
            return x if buffer is x else x.copy_(buffer)
        if x.dtype in (torch.float16, torch.bfloat16):
            wide = x.float()
            self.group.allreduce([wide]).wait()
            return x.copy_(wide)
        buffer = x if x.is_contiguous() else x.contiguous()
        self.group.allreduce([buffer]).wait()
        return x if buffer is x else x.copy_(buffer)

    def all_reduce_max_(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``x`` (contiguous) over the ranks, in place."""
        if self.size > 1:
            if self.comm is not None:
                return self.comm.all_reduce_(x, "max")
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MAX
            self.group.allreduce([x], opts).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' ``x`` (equal shapes) concatenated along ``dim`` in rank order."""
        if self.size == 1:
            return x
        if self.comm is not None:
            return torch.cat(self.comm.all_gather(x.contiguous()).unbind(0), dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` (contiguous) overwritten with rank ``src``'s."""
        if self.size > 1:
            if self.comm is not None:
                return self.comm.broadcast_(x, src)
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self.group.broadcast([x], opts).wait()
        return x


class RowParallelLinear(nn.Module):
    """``y = all_reduce(linear(x_r)) + b``: ``linear`` holds this rank's columns of the weight (its slice
    of the inputs; an nn.Linear or a QuantLinear, without bias), the bias is added once after the sum."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor | None, tp: TensorParallelGroup):
        super().__init__()
        self.linear = linear
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.linear, QuantLinear) and self.linear.quantizes_activations(x):
            y = self.linear.forward_fp8(*self._fp8_per_token(x), x.dtype)
        else:
            y = self.linear(x)
        y = self.tp.all_reduce_(y)
        return y if self.bias is None else y.add_(self.bias)

    def _fp8_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x's rows in FP8 with the scales the whole row would get (``max(amax / 448, 1e-12)``, the
        amax taken over every rank's slice), so each rank's partial product is the one tensor
        parallelism 1 computes for those inputs."""
        amax = x.abs().amax(dim=1, keepdim=True).float()
        scale = (self.tp.all_reduce_max_(amax) / FP8_MAX).clamp_min_(1e-12)
        codes = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, scale


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


def _column_linear(linear: nn.Module, spans: list[tuple[int, int]]) -> nn.Module:
    """A layer of the output rows ``spans`` of ``linear`` (an nn.Linear or a QuantLinear), bias included."""
    if isinstance(linear, QuantLinear):
        return linear.slice_rows(spans)
    weight, bias = linear.weight, linear.bias
    w = torch.cat([weight[a:b] for a, b in spans])
    out = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype,
                             device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(torch.cat([bias[a:b] for a, b in spans]))
    out.requires_grad_(False)
    return out


def _row_linear(linear: nn.Module, start: int, stop: int, tp: TensorParallelGroup) -> RowParallelLinear:
    """``linear``'s inputs ``[start, stop)`` as a row-parallel layer."""
    if isinstance(linear, QuantLinear):
        return RowParallelLinear(linear.slice_inputs(start, stop), linear.bias, tp)
    w = linear.weight[:, start:stop]
    part = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        part.weight.copy_(w)
    part.requires_grad_(False)
    return RowParallelLinear(part, linear.bias, tp)


def _intermediate_spans(inter: int, rank: int, size: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s rows of a fused gate/up weight of ``2 * inter`` rows: its gate rows, its up rows."""
    part = inter // size
    return [(rank * part, (rank + 1) * part), (inter + rank * part, inter + (rank + 1) * part)]


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
    sizes = [("num_attention_heads", cfg.num_attention_heads)]
    if cfg.num_experts:
        sizes.append(("moe_intermediate_size", cfg.moe_intermediate_size))
        if cfg.shared_expert_intermediate_size:
            sizes.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size))
    if not cfg.num_experts or any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        sizes.append(("intermediate_size", cfg.intermediate_size))
    for name, value in sizes:
        if value % size:
            raise ValueError(f"tensor_parallel_size={size} must divide {name}={value}")
    kv = cfg.num_key_value_heads
    if kv >= size and kv % size:
        raise ValueError(f"tensor_parallel_size={size} must divide num_key_value_heads={kv} (or be a multiple of it)")
    if kv < size and size % kv:
        raise ValueError(f"tensor_parallel_size={size} must be a multiple of num_key_value_heads={kv}")


def check_shardable(model: nn.Module, size: int) -> None:
    """Raises ValueError naming what keeps ``model`` from splitting over ``size`` ranks (its config,
    or a quantized row-parallel layer whose slices would cut a group of inputs)."""
    if type(model) is not LlamaForCausalLM:
        raise ValueError(f"tensor_parallel_size={size}: only Llama-family decoders split across ranks, "
                         f"not {type(model).__name__}")
    cfg = model.config
    check_config_shardable(cfg, size)
    q_part = cfg.num_attention_heads // size * cfg.head_dim
    for i, layer in enumerate(model.model.layers):
        rows = [("o_proj", layer.self_attn.o_proj, q_part)]
        if isinstance(layer.mlp, LlamaMLP):
            rows.append(("down_proj", layer.mlp.down_proj, cfg.intermediate_size // size))
        for name, linear, part in rows:
            if type(linear) not in (nn.Linear, QuantLinear):
                raise ValueError(f"tensor_parallel_size={size}: layer {i}'s {name} is a {type(linear).__name__}, "
                                 f"which does not split across ranks")
            if isinstance(linear, QuantLinear):
                try:
                    linear.slice_inputs(0, part)
                except ValueError as e:
                    raise ValueError(f"tensor_parallel_size={size}: layer {i}'s {name} ({linear.format}) splits "
                                     f"into {part} inputs per rank: {e}") from None


def _shard_moe_(block: SparseMoeBlock, tp: TensorParallelGroup) -> None:
    """Every expert's slice of the intermediate size (w13's gate and up rows, w2's columns), the shared
    expert's likewise; the router whole; the block's output summed over the ranks."""
    r, n = tp.rank, tp.size
    inter = block.w13.shape[1] // 2
    rows = torch.cat([torch.arange(a, b) for a, b in _intermediate_spans(inter, r, n)]).to(block.w13.device)
    part = inter // n
    block.w13 = nn.Parameter(block.w13.detach().index_select(1, rows).contiguous(), requires_grad=False)
    block.w2 = nn.Parameter(block.w2.detach()[:, :, r * part:(r + 1) * part].contiguous(), requires_grad=False)
    shared = block.shared_expert
    if shared is not None:
        shared_inter = shared.down_proj.in_features
        sliced = SharedExpert.__new__(SharedExpert)
        nn.Module.__init__(sliced)
        sliced.gate_up_proj = _column_linear(shared.gate_up_proj, _intermediate_spans(shared_inter, r, n))
        share = shared_inter // n
        sliced.down_proj = _row_linear(shared.down_proj, r * share, (r + 1) * share, tp).linear  # summed below
        block.shared_expert = sliced
    block.tp = tp


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
        attn.qkv_proj = _column_linear(attn.qkv_proj, [q_span, k_span, v_span])
        attn.o_proj = _row_linear(attn.o_proj, q_span[0], q_span[1], tp)
        attn.num_heads, attn.num_kv_heads = q_heads, kv_count
        attn.q_size, attn.kv_size = q_heads * hd, kv_count * hd
        if isinstance(mlp, SparseMoeBlock):
            _shard_moe_(mlp, tp)
        else:
            mlp.gate_up_proj = _column_linear(mlp.gate_up_proj, _intermediate_spans(cfg.intermediate_size, r, n))
            mlp.down_proj = _row_linear(mlp.down_proj, r * inter, (r + 1) * inter, tp)
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
