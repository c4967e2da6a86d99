"""The mixture-of-experts MLP block of Mixtral, Qwen2-MoE and Qwen3-MoE, in the Llama-family layer.

Parameters are stacked per layer: ``w13`` ``[num_experts, 2 * inter, hidden]`` holds every expert's
gate rows then up rows (Hugging Face's ``w1``/``w3`` or ``gate_proj``/``up_proj``), ``w2``
``[num_experts, hidden, inter]`` the down projections; the router is ``gate``; Qwen2-MoE adds an
always-on ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``.

- serving: :func:`tidal.ops.fused_moe` (routing, grouped expert products, weighted combine in one op).
- training: pure torch and differentiable; the block keeps its last load-balancing auxiliary loss
  (Switch Transformer / transformers' ``load_balancing_loss_func`` per layer) and router z-loss in
  ``aux_loss`` and ``z_loss`` for the training engine to add. Under expert parallelism
  (:meth:`SparseMoeBlock.shard_experts`) a rank keeps only its slice of the experts; the routed token
  rows travel to the rank that owns their expert and the outputs come back, both by all-to-all
  (differentiable: the backward sends the gradients the opposite way).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tidal.ops as ops
from tidal.models.config import ModelConfig


def _linear(in_features: int, out_features: int, dtype, device) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, dtype=dtype, device=device)


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send_splits`` go one chunk to each rank of ``group``; the result holds
    the chunks received, ``recv_splits`` rows from each rank in rank order. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x, recv_splits: list[int], send_splits: list[int], group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_splits, send_splits = ctx.splits
        out = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


class SharedExpert(nn.Module):
    """A dense SiLU MLP with fused gate-up rows (Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, inter: int, dtype, device):
        super().__init__()
        self.gate_up_proj = _linear(hidden, 2 * inter, dtype, device)
        self.down_proj = _linear(inter, hidden, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """Routed experts (and an optional shared expert) replacing a layer's MLP."""

    def __init__(self, config: ModelConfig, dtype, device):
        super().__init__()
        hidden, inter, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.num_experts, self.top_k = experts, config.num_experts_per_tok
        self.renormalize, self.fp32_weights = config.norm_topk_prob, config.routing_weights_fp32
        self.gate = _linear(hidden, experts, dtype, device)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inter, dtype=dtype, device=device))
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(hidden, config.shared_expert_intermediate_size, dtype, device)
            self.shared_expert_gate = _linear(hidden, 1, dtype, device)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        # Training knobs (set by the training engine from its ``moe`` config): None = no capacity.
        self.capacity_factor: float | None = None
        self.eval_capacity_factor: float | None = None
        self.min_capacity = 4
        self.drop_tokens = True
        # What the last training forward measured.
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None  # [num_experts] routed slots, before dropping
        self.num_dropped = 0
        # Expert parallelism (shard_experts): this rank holds experts [first_expert, first_expert +
        # w13.shape[0]) of the ep_size ranks of ep_group.
        self.ep_group = None
        self.ep_size, self.first_expert = 1, 0
        # Tensor-parallel serving (tidal.models.tensor_parallel): each rank holds a slice of every
        # expert's intermediate size and the block's output is summed over tp's ranks.
        self.tp = None

    def shard_experts(self, ep_rank: int, ep_size: int, group) -> None:
        """Keeps only this rank's ``num_experts / ep_size`` experts (training under expert parallelism:
        rank ``ep_rank`` of ``group`` owns experts ``[ep_rank * n, (ep_rank + 1) * n)``)."""
        if self.num_experts % ep_size:
            raise ValueError(f"moe.ep_size={ep_size} must divide the model's num_experts={self.num_experts}")
        if self.ep_size != 1:
            raise ValueError("the experts of this block are already sharded")
        local = self.num_experts // ep_size
        lo = ep_rank * local
        with torch.no_grad():
            self.w13 = nn.Parameter(self.w13[lo:lo + local].clone(), requires_grad=self.w13.requires_grad)
            self.w2 = nn.Parameter(self.w2[lo:lo + local].clone(), requires_grad=self.w2.requires_grad)
        self.ep_group, self.ep_size, self.first_expert = group, ep_size, lo

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Serving: ``x`` [num_tokens, hidden] -> [num_tokens, hidden]; ``train``: :meth:`forward_train`
        (called through the module so that ZeRO stage 3's hooks gather the experts around it)."""
        if train:
            return self.forward_train(x)
        if self.ep_group is not None:
            raise RuntimeError("this block holds a slice of the experts (expert-parallel training); serve the "
                               "weights of the engine's full_state_dict()")
        out = ops.fused_moe(x, self.gate(x), self.w13, self.w2, self.top_k, self.renormalize, self.fp32_weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if self.tp is None else self.tp.all_reduce_(out)

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Training: ``x`` [..., hidden], differentiable through the router and every expert."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = logits.float().softmax(dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.fp32_weights:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        # NOTE(tidal): slots sorted by expert, first choices before second ones (what a capacity keeps),
        # one product per expert that received any: the training path; the serving op groups the
        # same way without leaving C++.
        num_tokens = flat.shape[0]
        slot_rank = torch.arange(self.top_k, device=x.device).repeat(num_tokens)
        key = experts.flatten() * (self.top_k * num_tokens) + slot_rank * num_tokens + \
            torch.arange(num_tokens, device=x.device).repeat_interleave(self.top_k)
        order = key.argsort()
        counts_t = torch.bincount(experts.flatten(), minlength=self.num_experts)
        self.expert_counts = counts_t.detach()
        counts = counts_t.tolist()
        capacity = self.capacity(num_tokens)
        self.num_dropped = sum(max(0, c - capacity) for c in counts) if capacity is not None else 0
        # the kept slots, still sorted by expert, and how many each expert kept
        kept_counts = counts if capacity is None else [min(c, capacity) for c in counts]
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        kept = order if capacity is None else torch.cat(
            [order[b:b + k] for b, k in zip(starts, kept_counts)] + [order[:0]])
        tokens = kept // self.top_k
        rows = flat[tokens]
        y = self._experts(rows, kept_counts) if self.ep_group is None else self._experts_parallel(rows, kept_counts)
        out = out.index_add(0, tokens, (y * weights.flatten()[kept, None]).to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert.forward_train(flat)
        self.aux_loss = self.load_balancing_loss(probs, experts)
        self.z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return out.reshape(shape)

    def _experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """SiLU-gated MLP of this rank's expert e over the next ``counts[e]`` rows of ``rows``."""
        inter = self.w2.shape[2]
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                h = rows[start:start + count] @ self.w13[e].T
                outs.append((F.silu(h[:, :inter]) * h[:, inter:]) @ self.w2[e].T)
                start += count
        return torch.cat(outs) if outs else rows.new_zeros(0, self.w2.shape[1])

    def _experts_parallel(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``_experts`` over all experts of the expert-parallel group: ``rows`` (sorted by global
        expert, ``counts[e]`` each) go to the ranks owning their experts, come back computed."""
        local, group, ep = self.w13.shape[0], self.ep_group, self.ep_size
        send = torch.tensor(counts, dtype=torch.int64, device=rows.device).view(ep, local)
        recv = torch.empty_like(send)  # recv[src, e]: rows rank src sends to this rank's expert e
        dist.all_to_all_single(recv, send, group=group)
        send_splits, recv_counts = send.sum(1).tolist(), recv.tolist()
        recv_splits = [sum(r) for r in recv_counts]
        arrived = _AllToAll.apply(rows, recv_splits, send_splits, group)  # by source rank, then expert
        # regroup by expert (then source rank) for one product per expert, and back
        index, src_start = [[] for _ in range(local)], 0
        for src in range(ep):
            offset = src_start
            for e in range(local):
                index[e].append(torch.arange(offset, offset + recv_counts[src][e], device=rows.device))
                offset += recv_counts[src][e]
            src_start += recv_splits[src]
        none = torch.zeros(0, dtype=torch.int64, device=rows.device)
        perm = torch.cat([i for per_expert in index for i in per_expert] + [none])
        by_expert = self._experts(arrived[perm], [sum(recv_counts[src][e] for src in range(ep)) for e in range(local)])
        computed = torch.empty_like(by_expert).index_copy(0, perm, by_expert)
        return _AllToAll.apply(computed, send_splits, recv_splits, group)

    def capacity(self, num_tokens: int) -> int | None:
        """Routed slots an expert keeps in this forward (DeepSpeed's rule), None for no limit."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None or not self.drop_tokens:
            return None
        return max(self.min_capacity, math.ceil(num_tokens * self.top_k / self.num_experts * factor))

    def load_balancing_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``num_experts * sum_e f_e * P_e``: f_e the share of routed slots that go to expert e, P_e its
        mean router probability (transformers' load_balancing_loss_func for one layer); 1 when
        perfectly balanced."""
        chosen = F.one_hot(experts, self.num_experts).float()  # [tokens, top_k, experts]
        tokens_per_expert = chosen.mean(dim=0)  # [top_k, experts]
        router_prob_per_expert = probs.mean(dim=0)  # [experts]
        return self.num_experts * (tokens_per_expert * router_prob_per_expert[None]).sum()

    def hf_targets(self, prefix: str, family: str) -> dict[str, tuple[torch.Tensor, int | None, int | None]]:
        """Hugging Face tensor name -> (tensor or view, first row, end row), as LlamaForCausalLM._hf_targets."""
        inter = self.w2.shape[2]
        targets = {}
        if family == "mixtral":
            block = f"{prefix}block_sparse_moe."
            names = ("w1", "w3", "w2")
        else:
            block = f"{prefix}mlp."
            names = ("gate_proj", "up_proj", "down_proj")
        targets[f"{block}gate.weight"] = (self.gate.weight, None, None)
        for e in range(self.num_experts):
            targets[f"{block}experts.{e}.{names[0]}.weight"] = (self.w13[e], 0, inter)
            targets[f"{block}experts.{e}.{names[1]}.weight"] = (self.w13[e], inter, 2 * inter)
            targets[f"{block}experts.{e}.{names[2]}.weight"] = (self.w2[e], None, None)
        if self.shared_expert is not None:
            shared_inter = self.shared_expert.down_proj.weight.shape[1]
            fused = self.shared_expert.gate_up_proj.weight
            targets[f"{block}shared_expert.gate_proj.weight"] = (fused, 0, shared_inter)
            targets[f"{block}shared_expert.up_proj.weight"] = (fused, shared_inter, 2 * shared_inter)
            targets[f"{block}shared_expert.down_proj.weight"] = (self.shared_expert.down_proj.weight, None, None)
            targets[f"{block}shared_expert_gate.weight"] = (self.shared_expert_gate.weight, None, None)
        return targets
