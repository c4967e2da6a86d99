"""The training engine: data parallelism with ZeRO stages 0-3 over one flat parameter buffer.

``tidal.initialize(model, config)`` lays every trainable parameter end to end in one flat buffer
(the C++ partition plan decides offsets, shard ranges and communication buckets), keeps fp32 master
weights and Adam state for the shard this rank owns, and runs:

- ``engine(*args)``: the module's forward;
- ``engine.backward(loss)``: backward of ``loss / gradient_accumulation_steps`` (times the fp16 loss
  scale), then the micro-batch's gradients are added into an fp32 flat accumulator: below stage 3
  with an fp32 compute dtype every ``param.grad`` is a view of the accumulator (clear gradients
  only through the engine or with ``zero_grad(set_to_none=True)``), otherwise each gradient is
  folded in by a hook as soon as autograd produces it;
- ``engine.step()``: at the accumulation boundary only, reduces gradients across ranks (stages 0 and
  1: all-reduce; stage 2: reduce-scatter by buckets aligned to shard boundaries, so each rank receives
  only its shard), checks fp16 overflow, clips by the global norm, steps Adam/AdamW on the owned fp32
  shard, and all-gathers the updated weights back into the model's parameters.

Stage 0 keeps full optimizer state on every rank; stage 1 shards it; stage 2 also shards gradients
once they are reduced; stage 3 also shards the parameters (tidal.train.stage3 gathers each module's
parameters around its use).

Of ``zero_optimization``'s tuning keys, ``reduce_bucket_size`` sets the buckets gradients are
reduced by (stage 2: reduce-scatter buckets aligned to shard boundaries; stages 0 and 1: all-reduced
ranges of the flat buffer; stage 3: runs of modules). ``overlap_comm`` below stage 3 (several ranks,
no optimizer offload, no expert parallelism) starts each bucket's reduction during the boundary's
backward pass as soon as its gradients are final (:mod:`tidal.train.overlap`; the results equal the
non-overlapped ones bit for bit). At stage 3 on several ranks gradients are partitioned during every
backward pass, each rank accumulating only its shard (:mod:`tidal.train.stage3`), with the
reduce-scatters overlapped with the backward pass under ``overlap_comm`` (DeepSpeed's default at
stage 3) and waited for one by one without it; ``stage3_prefetch_bucket_size`` and
``stage3_max_live_parameters`` bound the parameters gathered ahead of use, in the forward and the
backward pass. ``allgather_bucket_size`` bounds the all-gathers that publish updated weights at
stages 1 and 2. ``contiguous_gradients`` is accepted and always true: gradients live in one flat
buffer. Inputs are not cast to the compute dtype (as in DeepSpeed): pass fp16/bf16 inputs where
the model expects them.

ZeRO-Offload (``zero_optimization.offload_optimizer.device = "cpu"``): the fp32 master weights and
Adam moments of the owned range live in host memory (pinned with ``pin_memory`` when the model is on
a GPU); at the step the reduced gradient goes to the host in chunks, the C++ Adam steps each chunk as
its copy lands, and (stage 0, or one rank) each updated chunk is copied back at once; otherwise the
updated range is all-gathered as usual. On one rank (stages 0-2) the trip to the host overlaps the
backward pass instead (:mod:`tidal.train.offload`): each chunk is copied as soon as its gradients are
final and, without gradient clipping or fp16 loss scaling, stepped right away by a host thread while
the GPU runs the rest of the backward pass. ``offload_param`` (stage 3) keeps the parameter shard
itself in host memory: each module's gather copies its part in. With several ranks the gradients are
reduced on the device after the backward pass, then offloaded.

Activation checkpointing: the config's ``activation_checkpointing`` section configures
:mod:`tidal.checkpointing` (DeepSpeed's keys) and sets the per-layer ``policy`` of tidal's models.

Expert parallelism (``moe.ep_size`` = k > 1, every ZeRO stage): consecutive groups of k ranks split
each mixture-of-experts layer's experts (rank r holds slice r % k) and exchange routed tokens by
all-to-all. The experts a rank holds live in a flat buffer of their own (:class:`_ExpertPartition`),
ZeRO-partitioned over the ``world_size / k`` ranks holding the same slice (at stage 3 their
parameters too, gathered over those ranks around each MoE block's call); every other parameter is
partitioned over all ranks as above. Gradients of both are averaged over all ranks' micro-batches.
"""

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from tidal import _core
from tidal.models.moe import SparseMoeBlock
from tidal.train import comm
from tidal.train.config import TrainConfig, load_config
from tidal.train.loss_scaler import DynamicLossScaler, StaticLossScaler, has_overflow
from tidal.train.lr_schedules import build_scheduler

_log = logging.getLogger("tidal.train")
_ALIGNMENT = 128  # elements: 512 bytes of fp32, keeps every shard and bucket vector-aligned


@dataclass
class _Slot:
    param: torch.nn.Parameter
    offset: int  # in the flat buffer
    numel: int
    shape: torch.Size
    grad_view: torch.Tensor | None = None  # below stage 3: param.grad, a view of the flat gradient buffer


def _attach_flat_grads(part) -> None:
    """Below stage 3, how gradients reach the accumulator without a pass over the parameters after
    the backward pass. When the accumulator has the compute dtype (fp32 training, or 16-bit training
    on one rank without accumulation over micro-batches) every ``.grad`` is a view of it and autograd
    accumulates straight into it. Otherwise a post-accumulate hook folds each gradient into the fp32
    accumulator as soon as autograd has produced it and frees it, so the compute-dtype gradients
    never all exist at once (as at stage 3)."""
    part.flat_grads = part.grad_accum if part.grad_accum.dtype == part.compute_dtype else None
    for s in part.slots:
        if part.flat_grads is not None:
            s.grad_view = part.flat_grads[s.offset:s.offset + s.numel].view(s.shape)
            s.param.grad = s.grad_view
        else:
            s.param.register_post_accumulate_grad_hook(_fold_into(part.grad_accum, s))


def _fold_into(accum: torch.Tensor, s: "_Slot"):
    def hook(param: torch.nn.Parameter) -> None:
        with torch.no_grad():
            accum[s.offset:s.offset + s.numel].add_(param.grad.reshape(-1))
        param.grad = None
    return hook


def _collect_flat_grads(part) -> list[int]:
    """After a backward pass below stage 3: gradients that did not reach the accumulator (a
    ``.grad`` the caller replaced or dropped, or one autograd added out of place) are added in and
    the views re-attached. Returns the indices of the slots whose gradient was added here."""
    added = []
    for i, s in enumerate(part.slots):
        g = s.param.grad
        if s.grad_view is None:
            if g is not None:  # set outside autograd: the hook never saw it
                part.grad_accum[s.offset:s.offset + s.numel].add_(g.reshape(-1))
                s.param.grad = None
                added.append(i)
        elif g is not s.grad_view:
            if g is not None:
                s.grad_view.add_(g)
                added.append(i)
            s.param.grad = s.grad_view
    return added


def _params_by_module(model: torch.nn.Module, only=None):
    """Trainable parameters in module order (each once, with the first module that owns it), the
    index where each module's own parameters start, and per module the group indices it uses.
    ``only(param)``: which parameters to take (default all)."""
    params, starts, owner, module_groups = [], [], {}, {}
    for module in model.modules():
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad and (only is None or only(p))]
        new = [p for p in direct if id(p) not in owner]
        if new:
            starts.append(len(params))
            for p in new:
                owner[id(p)] = len(starts) - 1
                params.append(p)
        if direct:
            module_groups[module] = sorted({owner[id(p)] for p in direct})
    return params, starts, module_groups


def _reduce(flat: torch.Tensor, plan, stage: int, size: int, owned: tuple[int, int], group,
            divisor: int, all_reduce_buckets: list | None = None) -> torch.Tensor:
    """The gradient of the owned range of ``flat`` summed over the ``size`` ranks of ``group`` and
    divided by ``divisor``: stage 2 reduce-scatters by buckets aligned to shard boundaries, lower
    stages all-reduce (by ``all_reduce_buckets``, ranges of ``flat``, when given)."""
    if size > 1 and stage >= 2:
        shard = plan.shard_numel
        out = torch.empty(shard, dtype=flat.dtype, device=flat.device)
        by_rank = flat.view(size, shard)
        for lo, hi in plan.buckets:  # the same local range of every shard: a true reduce-scatter
            comm.reduce_scatter(out[lo:hi], by_rank[:, lo:hi].contiguous(), group=group)
        return out.div_(divisor) if divisor != 1 else out
    if size > 1:
        for lo, hi in all_reduce_buckets or [(0, flat.numel())]:
            comm.all_reduce(flat[lo:hi], group=group)
    lo, hi = owned
    return flat[lo:hi].div_(divisor) if divisor != 1 else flat[lo:hi]


def _publish(master: torch.Tensor, flat_params: torch.Tensor, plan, stage: int, size: int, group,
             bucket_numel: int | None = None) -> None:
    """Copies updated fp32 master weights (the owned range) into every rank's compute-dtype buffer.
    Each rank casts its range to the compute dtype first (the cast is per element, so the result is
    the same) and the ranges are all-gathered straight into the buffer, or by ``bucket_numel``
    elements at a time (``allgather_bucket_size``) through a buffer of that size."""
    with torch.no_grad():
        if stage == 0 or size == 1:
            flat_params.copy_(master)
            return
        local = master.to(flat_params.device, non_blocking=True).to(flat_params.dtype)
        shard = plan.shard_numel
        step = max(int(bucket_numel) // size, 1) if bucket_numel else shard
        if step >= shard:
            comm.all_gather(flat_params, local, group=group)
            return
        by_rank = flat_params.view(size, shard)
        for lo in range(0, shard, step):
            hi = min(lo + step, shard)
            gathered = torch.empty(size, hi - lo, dtype=flat_params.dtype, device=flat_params.device)
            comm.all_gather(gathered.view(-1), local[lo:hi].contiguous(), group=group)
            by_rank[:, lo:hi].copy_(gathered)


def _adam_update(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, decoupled: bool,
                 grad_scale: float = 1.0, param_copy: torch.Tensor | None = None) -> None:
    """One Adam/AdamW step of fp32 ``param`` in place from ``grad / grad_scale``, the result also
    written to ``param_copy`` (the compute-dtype weights) when given: the fused kernel on the CPU and
    on CUDA (one pass over the buffers), torch's single-tensor arithmetic in the same order elsewhere
    (dividing ``grad`` in place first)."""
    beta1, beta2 = betas
    if _fused_adam_on(param.device):
        _ops().adam_step_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled, grad_scale,
                          param_copy)
        return
    if grad.dtype != torch.float32:
        grad = grad.float()
    if grad_scale != 1.0:
        grad.mul_(1.0 / grad_scale)
    if decoupled:
        param.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-(lr / bias_correction1))
    if param_copy is not None:
        param_copy.copy_(param)


# NOTE(tidal): under optimizer offload the owned range moves to the host in chunks of this many
# elements (64 MB of fp32): the host steps chunk i while chunk i + 1 is still being copied.
_OFFLOAD_CHUNK = 1 << 24


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of ``t`` in host memory, page-locked when ``pin``."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    out.copy_(t)
    return out


def _offloaded_adam(part, grad: torch.Tensor, chunk: int, publish, host_events: list | None = None,
                    **adam) -> None:
    """Adam on host-resident state (ZeRO-Offload) with the gradient where the reduction left it:
    every chunk's copy to the (pinned) host buffer is queued at once, the C++ Adam steps each chunk
    as soon as its copy lands, and ``publish(lo, hi, chunk)`` (when given) sends the updated chunk
    back at once, so the copies in both directions overlap the host's arithmetic. ``host_events``:
    the copies were queued during the backward pass (tidal.train.offload); per chunk, the event to
    wait for (None: already on the host)."""
    n = grad.numel()
    on_device = grad.device.type == "cuda"
    if on_device and part.host_grad is None:
        part.host_grad = torch.empty(n, dtype=torch.float32, pin_memory=True)
    host_grad = part.host_grad if on_device else grad
    ranges = []
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        event = None if host_events is None else host_events[len(ranges)]
        if on_device and host_events is None:
            host_grad[lo:hi].copy_(grad[lo:hi], non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(grad.device))
        ranges.append((lo, hi, event))
    for lo, hi, event in ranges:
        if event is not None:
            event.synchronize()
        _adam_update(part.master[lo:hi], host_grad[lo:hi], part.exp_avg[lo:hi], part.exp_avg_sq[lo:hi], **adam)
        if publish is not None:
            publish(lo, hi, part.master[lo:hi])


class _ExpertPartition:
    """The experts one rank holds under expert parallelism: their parameters end to end in a flat
    buffer of their own, fp32 master weights and Adam state for the range this rank owns among the
    ``len(ranks)`` ranks that hold the same experts (the expert-data-parallel group), as the engine's
    main buffer is partitioned among all ranks (stages 0-2)."""

    def __init__(self, params: list[torch.nn.Parameter], stage: int, group, ranks: list[int], rank: int,
                 bucket: int, compute_dtype: torch.dtype, offload: bool = False, pin: bool = False,
                 group_starts: list[int] | None = None, module_groups: dict | None = None):
        self.group, self.ranks, self.size, self.stage = group, ranks, len(ranks), stage
        self.index = index = ranks.index(rank)  # this rank's place among those holding these experts
        self.plan = _core.zero.make_plan([p.numel() for p in params], self.size, max(bucket, _ALIGNMENT),
                                         _ALIGNMENT, group_starts if stage == 3 else [0])
        self.slots = [_Slot(p, info.flat_offset, info.numel, p.shape) for p, info in zip(params, self.plan.params)]
        padded, shard = self.plan.padded_numel, self.plan.shard_numel
        self.owned = (0, padded) if stage == 0 else (index * shard, (index + 1) * shard)
        self.device = device = params[0].device
        self.compute_dtype = compute_dtype
        full = torch.zeros(padded, dtype=torch.float32, device=device)
        with torch.no_grad():
            for s in self.slots:
                full[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
        comm.broadcast(full, src=ranks[0], group=group)
        lo, hi = self.owned
        self.flat_params = self.flat_shard = self.gatherer = None
        if stage == 3:  # this rank keeps its shard; each MoE block's experts are gathered around its call
            from tidal.train.stage3 import ParameterGatherer

            self.flat_shard = full[lo:hi].to(compute_dtype)
            with torch.no_grad():
                for s in self.slots:
                    s.param.data = torch.empty(0, dtype=compute_dtype, device=device)
            self.gatherer = ParameterGatherer(self, module_groups, index, self.size, group)
        else:
            self.flat_params = full.to(compute_dtype)
            with torch.no_grad():
                for s in self.slots:
                    s.param.data = self.flat_params[s.offset:s.offset + s.numel].view_as(s.param)
        self.master = _host_copy(full[lo:hi], pin) if offload else full[lo:hi].clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad_accum = torch.zeros(padded, dtype=torch.float32, device=device)
        self.host_grad = None
        if stage < 3:
            _attach_flat_grads(self)

    def set_weights(self, flat: torch.Tensor) -> None:
        """The compute-dtype parameters from the full fp32 flat buffer of this partition (its whole
        range below stage 3, this rank's shard at stage 3)."""
        with torch.no_grad():
            if self.stage == 3:
                lo, hi = self.owned
                self.flat_shard.copy_(flat[lo:hi])
            else:
                self.flat_params.copy_(flat)

    def publish(self) -> None:
        """The updated master range into the compute-dtype parameters (collective below stage 3)."""
        if self.stage == 3:
            with torch.no_grad():
                self.flat_shard.copy_(self.master, non_blocking=True)
        else:
            _publish(self.master, self.flat_params, self.plan, self.stage, self.size, self.group)

    def full_weights(self) -> torch.Tensor:
        """Collective over the group: the fp32 weights of every expert this rank holds, flat."""
        device = self.device
        full = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=device)
        if self.stage == 0 or self.size == 1:
            full.copy_(self.master)
        else:
            comm.all_gather(full, self.master.to(device), group=self.group)
        return full


def _expert_parallel_groups(world: int, rank: int, ep_size: int):
    """(ep group, its ranks, expert-data-parallel group, its ranks) of ``rank``: ep groups are runs of
    ``ep_size`` consecutive ranks; the ranks holding the same experts are those equal modulo ep_size."""
    ep_ranks = [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(world // ep_size)]
    edp_ranks = [list(range(j, world, ep_size)) for j in range(ep_size)]
    ep_groups = comm.new_groups(ep_ranks)
    edp_groups = comm.new_groups(edp_ranks)
    g, j = rank // ep_size, rank % ep_size
    return ep_groups[g], ep_ranks[g], edp_groups[j], edp_ranks[j]


class Engine:
    """A model wrapped for data-parallel training (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig):
        self.module = model
        self.config = config
        self.moe_blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.moe_aux_loss: torch.Tensor | None = None
        for block in self.moe_blocks:
            block.capacity_factor = config.moe.capacity_factor
            block.eval_capacity_factor = config.moe.eval_capacity_factor
            block.min_capacity = config.moe.min_capacity
            block.drop_tokens = config.moe.drop_tokens
        self._configure_activation_checkpointing(config.activation_checkpointing)
        self.world_size, self.rank = comm.world_size(), comm.rank()
        zero = config.zero_optimization
        self.ep_size = config.moe.ep_size
        self.ep_group = self.experts = None
        self.ep_rank = 0  # which slice of every MoE layer's experts this rank holds
        if self.ep_size > 1:
            self._check_expert_parallel(zero.stage)
            self.ep_group, ep_ranks, edp_group, edp_ranks = _expert_parallel_groups(self.world_size, self.rank,
                                                                                   self.ep_size)
            for block in self.moe_blocks:
                block.shard_experts(ep_ranks.index(self.rank), self.ep_size, self.ep_group)
            self.ep_rank = ep_ranks.index(self.rank)
        params, group_starts, module_groups = _params_by_module(model)
        expert_params = []
        if self.ep_size > 1:  # the experts form a partition of their own (over their edp group)
            expert_ids = {id(t) for b in self.moe_blocks for t in (b.w13, b.w2) if t.requires_grad}
            params, group_starts, module_groups = _params_by_module(model, lambda p: id(p) not in expert_ids)
            expert_params, expert_starts, expert_groups = _params_by_module(model, lambda p: id(p) in expert_ids)
        if not params:
            raise ValueError("model has no parameter with requires_grad=True")
        self.device = params[0].device
        for p in params:
            if p.device != self.device:
                raise ValueError(f"all parameters must be on one device; found {p.device} and {self.device}")
        built_on_meta = self.device.type == "meta"  # tidal.zero.Init
        if built_on_meta:
            from tidal import zero as zero_init

            if zero.stage != 3:
                raise ValueError(f"a model built under tidal.zero.Init needs zero_optimization.stage=3, got "
                                 f"stage {zero.stage}")
            self.device = zero_init.target_device()
        self.stage = zero.stage
        self.offload_optimizer, self.offload_param = zero.offload_optimizer.enabled, zero.offload_param.enabled
        self.pin_memory = self.device.type == "cuda" and (
            zero.offload_optimizer.pin_memory if self.offload_optimizer else zero.offload_param.pin_memory)
        self.compute_dtype = (torch.bfloat16 if config.bf16.enabled else torch.float16 if config.fp16.enabled
                              else torch.float32)

        bucket = max(int(zero.reduce_bucket_size) // self.world_size, _ALIGNMENT)
        self.plan = _core.zero.make_plan([p.numel() for p in params], self.world_size, bucket, _ALIGNMENT,
                                         group_starts)
        self.slots = [_Slot(p, info.flat_offset, info.numel, p.shape) for p, info in zip(params, self.plan.params)]
        padded, shard = self.plan.padded_numel, self.plan.shard_numel
        self.owned = (0, padded) if self.stage == 0 else (self.rank * shard, (self.rank + 1) * shard)

        # fp32 master copy of the initial weights (rank 0's, broadcast). Below stage 3 the model's
        # parameters become views of one flat buffer in the compute dtype; at stage 3 each rank keeps
        # only its shard and the gatherer materialises a module's parameters around its use.
        if built_on_meta:  # only this rank's shard is ever built; master_full is that shard
            master_full = self._materialize_shard()
            master_lo = self.owned[0]
        else:
            master_full = torch.zeros(padded, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                for s in self.slots:
                    master_full[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
            comm.broadcast(master_full, src=0)
            master_lo = 0
        self.flat_params = self.flat_shard = self.gatherer = None
        if self.stage == 3:
            from tidal.train.stage3 import ParameterGatherer

            lo, hi = self.owned
            self.flat_shard = master_full[lo - master_lo:hi - master_lo].to(self.compute_dtype, copy=True)
            if self.offload_param:  # the shard lives in host memory; gathers copy it in per module
                self.flat_shard = _host_copy(self.flat_shard, zero.offload_param.pin_memory and
                                             self.device.type == "cuda")
            with torch.no_grad():
                for s in self.slots:
                    empty = torch.empty(0, dtype=self.compute_dtype, device=self.device)
                    if s.param.is_meta:  # .data cannot change a meta tensor's type: swap, keeping the object
                        torch.utils.swap_tensors(s.param, torch.nn.Parameter(empty, s.param.requires_grad))
                    else:
                        s.param.data = empty
            self.gatherer = ParameterGatherer(self, module_groups, self.rank, self.world_size,
                                              prefetch_numel=zero.stage3_prefetch_bucket_size,
                                              max_live_numel=zero.stage3_max_live_parameters)
            for module in self.module.modules():  # its gathers follow module calls: no fusion across them
                if hasattr(module, "fuse_across_modules"):
                    module.fuse_across_modules = False
        else:
            self.flat_params = master_full.to(self.compute_dtype)
            with torch.no_grad():
                for s in self.slots:
                    s.param.data = self.flat_params[s.offset:s.offset + s.numel].view_as(s.param)

        # fp32 master weights and Adam state for the owned range (everything at stage 0), in host
        # memory under optimizer offload.
        lo, hi = self.owned[0] - master_lo, self.owned[1] - master_lo
        self.master = _host_copy(master_full[lo:hi], self.pin_memory) if self.offload_optimizer else \
            master_full[lo:hi].clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # NOTE(tidal): on one rank, with no accumulation over micro-batches and the optimizer on the
        # device, each gradient is used once, as autograd leaves it: the accumulator is then the
        # 16-bit buffer autograd writes into (2 bytes a parameter instead of 4, no fold into fp32),
        # which Adam widens as it reads. The values are the same: an fp32 accumulator would hold
        # exactly these 16-bit gradients.
        direct = (self.stage < 3 and self.world_size == 1 and config.gradient_accumulation_steps == 1
                  and self.compute_dtype != torch.float32 and not self.offload_optimizer)
        # stage 3 on several ranks: gradients partitioned as the backward pass produces them, only
        # this rank's shard accumulated (tidal.train.stage3.GradientReducer)
        self.reducer = None
        if self.stage == 3 and self.world_size > 1 and not expert_params:
            from tidal.train.stage3 import GradientReducer

            self.reducer = GradientReducer(self.gatherer, shard, self.rank, self.world_size,
                                           int(zero.reduce_bucket_size), zero.overlap_comm)
            self.gatherer.reducer = self.reducer
            self.grad_accum = self.reducer.accum
        else:
            self.grad_accum = torch.zeros(padded, dtype=self.compute_dtype if direct else torch.float32,
                                          device=self.device)
        self.flat_grads = None
        if self.stage < 3:
            _attach_flat_grads(self)
        self.host_grad = None  # the pinned host buffer gradients go through under optimizer offload
        self.offload_chunk = _OFFLOAD_CHUNK
        self._published: list = []  # parts the last offloaded Adam already copied back
        self._host_events: list | None = None
        if expert_params:
            self.experts = _ExpertPartition(expert_params, self.stage, edp_group, edp_ranks, self.rank,
                                            int(zero.reduce_bucket_size) // len(edp_ranks), self.compute_dtype,
                                            self.offload_optimizer, self.pin_memory, expert_starts, expert_groups)
        # ZeRO-Offload on one rank overlaps the gradients' trip to the host (and, without clipping
        # or loss scaling, Adam itself) with the backward pass: tidal.train.offload
        self.offload_pipeline = None
        if self.offload_optimizer and self.stage < 3 and self.world_size == 1 and self.experts is None:
            from tidal.train.offload import OverlappedOffload

            self.offload_pipeline = OverlappedOffload(self)
        # overlap_comm below stage 3: buckets reduced during the boundary's backward pass
        from tidal.train.overlap import OverlappedReduction, all_reduce_buckets

        self.all_reduce_buckets = all_reduce_buckets(padded, zero.reduce_bucket_size, _ALIGNMENT) \
            if self.stage < 2 else None
        self.overlap = None
        if (zero.overlap_comm and self.stage < 3 and self.world_size > 1 and self.experts is None
                and not self.offload_optimizer):
            self.overlap = OverlappedReduction(self, self.all_reduce_buckets)

        opt = config.optimizer
        if opt is None:
            raise ValueError("the config names no optimizer; set optimizer.type to Adam or AdamW")
        self.decoupled = bool(opt.adam_w_mode)  # DeepSpeed: type Adam is AdamW unless adam_w_mode is false
        self.base_lr = float(opt.lr)
        self.betas = (float(opt.betas[0]), float(opt.betas[1]))
        self.eps = float(opt.eps)
        self.weight_decay = float(opt.weight_decay)
        # Optimizer step k uses the scheduler's rate after k scheduler steps (DeepSpeed's order).
        self.scheduler = build_scheduler(config, self.base_lr)
        self.loss_scaler = None
        if config.fp16.enabled:
            fp16 = config.fp16
            self.loss_scaler = (StaticLossScaler(fp16.loss_scale) if fp16.loss_scale > 0 else DynamicLossScaler(
                initial_scale=2.0 ** fp16.initial_scale_power, scale_window=fp16.loss_scale_window,
                hysteresis=fp16.hysteresis, min_scale=fp16.min_loss_scale,
                consecutive_hysteresis=fp16.consecutive_hysteresis))

        self.gradient_accumulation_steps = config.gradient_accumulation_steps
        self.micro_steps = 0
        self.global_steps = 0
        self.optimizer_steps = 0  # global steps that were not skipped for overflow
        self.skipped_steps = 0
        self.client_state: dict | None = None  # what the last loaded checkpoint's saver passed
        self._pending_save = None  # the last save_checkpoint's writer (tidal.train.checkpoint.PendingSave)

    def _materialize_shard(self) -> torch.Tensor:
        """The fp32 owned range of a model built under tidal.zero.Init: a module at a time, each of
        its parameters made whole on the CPU (from the checkpoint, else the module's initialisation;
        rank 0's values broadcast), this rank's slice kept, the rest dropped. Buffers move to the
        engine's device."""
        from tidal import zero as zero_init

        lo, hi = self.owned
        shard = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        slots = {id(s.param): s for s in self.slots}
        materializer = zero_init.Materializer(self.module)
        comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        with torch.no_grad():
            for module in self.module.modules():
                for pid, value in materializer.module_values(module).items():
                    s = slots.get(pid)
                    if s is None:
                        continue
                    value = value.reshape(-1).to(comm_device)
                    comm.broadcast(value, src=0)
                    a, b = max(s.offset, lo), min(s.offset + s.numel, hi)
                    if a < b:
                        shard[a - lo:b - lo].copy_(value[a - s.offset:b - s.offset])
                for name, buf in module.named_buffers(recurse=False):
                    if buf.is_meta:
                        raise ValueError(f"buffer {name!r} of {type(module).__name__} is on the meta device: build it "
                                         "outside tidal.zero.Init")
                    setattr(module, name, buf.to(self.device))
        return shard

    def _configure_activation_checkpointing(self, ac) -> None:
        """The config's ``activation_checkpointing`` section: tidal.checkpointing's settings, and
        the per-layer policy of every submodule that offers one (tidal's models)."""
        if not ac.enabled:
            return
        from tidal import checkpointing

        checkpointing.configure(partition_activations=ac.partition_activations,
                                contiguous_checkpointing=ac.contiguous_memory_optimization,
                                num_checkpoints=ac.number_checkpoints, checkpoint_in_cpu=ac.cpu_checkpointing,
                                synchronize=ac.synchronize_checkpoint_boundary, profile=ac.profile)
        for module in self.module.modules():
            if hasattr(module, "set_activation_checkpointing"):
                module.set_activation_checkpointing(ac.policy)

    def _check_expert_parallel(self, stage: int) -> None:
        ep, world = self.ep_size, self.world_size
        if not self.moe_blocks:
            raise ValueError(f"moe.ep_size={ep} but the model has no mixture-of-experts layer")
        if world % ep:
            raise ValueError(f"moe.ep_size={ep} must divide the world size {world}")
        for block in self.moe_blocks:
            if block.num_experts % ep:
                raise ValueError(f"moe.ep_size={ep} must divide the model's num_experts={block.num_experts}")

    # ---- the training loop ---------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next ``step()`` will step the optimizer."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def get_lr(self) -> list[float]:
        return [self._lr()]

    def _lr(self) -> float:
        return self.base_lr if self.scheduler is None else float(self.scheduler.get_lr())

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else float(self.loss_scaler.scale)

    def _moe_loss(self) -> torch.Tensor | None:
        """coef * the MoE blocks' load-balancing losses + z_coef * their router z-losses from the last
        forward (each block's once), or None when no block ran."""
        total, aux_sum, moe = None, None, self.config.moe
        for block in self.moe_blocks:
            if block.aux_loss is None:
                continue
            coef = block.router_aux_loss_coef if moe.aux_loss_coef is None else moe.aux_loss_coef
            term = coef * block.aux_loss + moe.z_loss_coef * block.z_loss
            total = term if total is None else total + term
            aux_sum = block.aux_loss.detach() if aux_sum is None else aux_sum + block.aux_loss.detach()
            block.aux_loss = block.z_loss = None
        if aux_sum is not None:
            self.moe_aux_loss = aux_sum
        return total

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; gradients accumulate in fp32 until the boundary.

        With mixture-of-experts layers, the loss backpropagated also holds ``moe.aux_loss_coef`` times
        each layer's load-balancing loss and ``moe.z_loss_coef`` times its router z-loss from the last
        forward; the sum of the load-balancing losses is kept in ``moe_aux_loss``."""
        extra = self._moe_loss()
        if extra is not None:
            loss = loss + extra
        scaled = loss.float() * (self.loss_scale / self.gradient_accumulation_steps)
        pipeline = self.offload_pipeline if self.is_gradient_accumulation_boundary() else None
        if pipeline is not None:
            pipeline.begin(step_early=self.config.gradient_clipping <= 0 and self.loss_scaler is None,
                           adam=self._adam_options(), publish=self._chunk_publisher(self))
        overlap = self.overlap if self.is_gradient_accumulation_boundary() else None
        if overlap is not None:
            overlap.begin()
        gatherers = [] if self.gatherer is None else \
            [self.gatherer] + ([] if self.experts is None else [self.experts.gatherer])
        if self.reducer is not None:
            self.reducer.begin()
        for gatherer in gatherers:
            gatherer.backward_phase = True
        try:
            with warnings.catch_warnings():
                # stage 3's backward pre-hooks also fire on modules whose inputs need no gradient (the
                # first layer); that is what they are for, so torch's notice about it is noise here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                scaled.backward()
        except BaseException:
            if pipeline is not None:
                pipeline.abort()
            if overlap is not None:
                overlap.cancel()
            if self.reducer is not None:
                self.reducer.cancel()
            raise
        finally:
            for gatherer in gatherers:
                gatherer.backward_phase = False
        if self.gatherer is not None:  # stage 3: the gradient hooks already moved every gradient
            if self.reducer is not None:
                self.reducer.end_backward()
            for gatherer in gatherers:
                gatherer.release_all()
                gatherer.end_of_forward_pass()
            return
        with torch.no_grad():
            for part in [self] if self.experts is None else [self, self.experts]:
                added = _collect_flat_grads(part)
                if overlap is not None and added:
                    launched = {k for i in added for k in overlap.slot_buckets[i] if k > overlap.next}
                    if launched:
                        raise ValueError(f"zero_optimization.overlap_comm: the gradient of parameter "
                                         f"{added[0]} was set outside autograd after its bucket's reduce-scatter "
                                         f"had started; turn overlap_comm off to change gradients by hand")
        if pipeline is not None:
            pipeline.end_backward()

    def step(self) -> None:
        """Ends a micro-batch; at the accumulation boundary, reduces gradients and steps the optimizer."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        ran = self.offload_pipeline is not None and self.offload_pipeline.active
        stepped = ran and self.offload_pipeline.finish()
        # the pipeline queued their copies to the host during the backward pass
        self._host_events = self.offload_pipeline.events if ran and not stepped else None
        grads = [] if stepped else self._reduce_gradients()
        scale = self.loss_scale  # the scale this step's gradients carry, before update() may grow it
        skip = False
        if self.loss_scaler is not None:
            skip = self.loss_scaler.update(comm.any_true(has_overflow(grads), self.device))
        if skip:
            self.skipped_steps += 1
        else:
            if stepped:  # Adam ran chunk by chunk during the backward pass, weights published
                self._published = [self]
            else:
                # The loss scale and the clipping coefficient are undone inside the Adam pass (its
                # grad_scale), not by passes of their own over the gradients.
                grad_scale = scale
                if self.config.gradient_clipping > 0:
                    coef = self.config.gradient_clipping / (self._global_norm(grads) / scale + 1e-6)
                    if coef < 1.0:  # torch.nn.utils.clip_grad_norm_'s rule
                        grad_scale = scale / coef
                self._adam(grads, grad_scale)
            self._publish_weights()
            self.optimizer_steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
        if self.experts is not None:
            self.experts.grad_accum.zero_()
        if self.offload_pipeline is not None:
            self.offload_pipeline.before_gradients_change()
        self.grad_accum.zero_()
        self.global_steps += 1
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0 and self.rank == 0:
            aux = "" if self.moe_aux_loss is None else f", moe aux loss {float(self.moe_aux_loss):.4g}"
            _log.info("step %d: lr %.3g, loss scale %g, skipped %d%s", self.global_steps, self._lr(), self.loss_scale,
                      self.skipped_steps, aux)

    # ---- pieces of the step --------------------------------------------------------------------

    def _reduce_gradients(self) -> list[torch.Tensor]:
        """The gradients of the owned ranges (the main buffer's, then the experts'), averaged over
        every rank's micro-batches."""
        if self.overlap is not None and self.overlap.pending:
            grads = [self.overlap.finish(self.world_size)]
        elif self.reducer is not None:  # already reduced, pass by pass
            self.reducer.end_backward()  # (a backward pass run without engine.backward)
            grads = [self.grad_accum.div_(self.world_size)]
        else:
            grads = [_reduce(self.grad_accum, self.plan, self.stage, self.world_size, self.owned, None,
                             self.world_size, self.all_reduce_buckets)]
        if self.experts is not None:
            e = self.experts
            # each expert's gradient already sums its ep group's tokens; the replicas add the rest
            grads.append(_reduce(e.grad_accum, e.plan, e.stage, e.size, e.owned, e.group, self.world_size))
        return grads

    def _global_norm(self, grads: list[torch.Tensor]) -> float:
        """The 2-norm over every rank's gradients (one host synchronisation). Each buffer's norm is
        reduced in fp32 (as torch.nn.utils.clip_grad_norm_ does), with no copy of the buffer."""
        sq = torch.linalg.vector_norm(grads[0], dtype=torch.float32).double().square()
        if self.stage > 0 and self.world_size > 1:  # each rank holds a different shard
            comm.all_reduce(sq)
        if self.experts is not None:
            # below stage 1 the ranks of an ep group hold the ep group's experts whole; from stage 1
            # each expert element is owned by exactly one rank in the world
            expert_sq = torch.linalg.vector_norm(grads[1], dtype=torch.float32).double().square()
            comm.all_reduce(expert_sq, group=self.ep_group if self.stage == 0 else None)
            sq = sq + expert_sq
        return math.sqrt(float(sq))

    def _adam(self, grads: list[torch.Tensor], grad_scale: float = 1.0) -> None:
        """Adam on every part's owned range with the gradients divided by ``grad_scale``; under
        optimizer offload on the host, chunk by chunk, each chunk published to the compute-dtype
        parameters as soon as it is stepped where no collective is needed (stage 0 or one rank)."""
        parts = [self] if self.experts is None else [self, self.experts]
        adam = self._adam_options(grad_scale)
        self._published = []
        for part, grad in zip(parts, grads):
            if not self.offload_optimizer:
                # the compute-dtype weights are written in the Adam pass itself where they are a
                # plain copy of the master range (no collective in between)
                target = self._local_publish_target(part)
                _adam_update(part.master, grad, part.exp_avg, part.exp_avg_sq, param_copy=target, **adam)
                if target is not None:
                    self._published.append(part)
                continue
            publish = self._chunk_publisher(part)
            if publish is not None:
                self._published.append(part)
            _offloaded_adam(part, grad, self.offload_chunk, publish,
                            host_events=self._host_events if part is self else None, **adam)

    def _adam_options(self, grad_scale: float = 1.0) -> dict:
        """The keyword arguments of _adam_update for the coming optimizer step."""
        return dict(step=self.optimizer_steps + 1, lr=self._lr(), betas=self.betas, eps=self.eps,
                    weight_decay=self.weight_decay, decoupled=self.decoupled, grad_scale=grad_scale)

    def _chunk_publisher(self, part):
        """``publish(lo, hi, chunk)`` copying an updated chunk of ``part``'s master range into its
        compute-dtype parameters, or None where that needs a collective (the range is gathered after
        the step)."""
        size = self.world_size if part is self else part.size
        if not (self.stage < 3 and (self.stage == 0 or size == 1)):
            return None
        base = part.owned[0]

        def publish(lo, hi, chunk, flat=part.flat_params):
            with torch.no_grad():
                flat[base + lo:base + hi].copy_(chunk, non_blocking=True)
        return publish

    def _local_publish_target(self, part) -> torch.Tensor | None:
        """The compute-dtype buffer that is an element-for-element copy of ``part``'s master range
        (stage 0 or one rank: the flat parameters; stage 3: this rank's parameter shard), or None
        where publishing needs a collective."""
        size = self.world_size if part is self else part.size
        if self.stage < 3 and (self.stage == 0 or size == 1):
            target = part.flat_params
        elif self.stage == 3:
            target = part.flat_shard
        else:
            return None
        ok = (target.numel() == part.master.numel() and target.device == part.master.device
              and target.is_contiguous() and _fused_adam_on(part.master.device))
        return target if ok else None

    def _publish_weights(self) -> None:
        """Copies the updated fp32 master shard(s) into every rank's compute-dtype parameters (what
        the offloaded Adam did not already send back chunk by chunk)."""
        published = self._published
        if not any(p is self for p in published):
            if self.stage == 3:  # parameters are gathered from the shard when a module runs
                with torch.no_grad():
                    self.flat_shard.copy_(self.master, non_blocking=True)
            else:
                _publish(self.master, self.flat_params, self.plan, self.stage, self.world_size, None,
                         self.config.zero_optimization.allgather_bucket_size)
        e = self.experts
        if e is not None and not any(p is e for p in published):
            e.publish()

    # ---- state -----------------------------------------------------------------------------------

    def set_full_weights(self, flat: torch.Tensor) -> None:
        """Sets the model's weights from a full fp32 flat buffer laid out by this engine's plan
        (checkpoint loading); the master shard is the caller's to set."""
        with torch.no_grad():
            if self.stage == 3:
                self.flat_shard.copy_(flat[self.rank * self.plan.shard_numel:(self.rank + 1) * self.plan.shard_numel])
            else:
                self.flat_params.copy_(flat)

    def save_checkpoint(self, directory: str, tag: str | None = None, client_state: dict | None = None,
                        async_save: bool = False, keep_last: int | None = None) -> str:
        """Collective: a sharded checkpoint in ``directory/tag`` (see tidal.train.checkpoint); returns
        its path. With ``async_save`` only the copy of the state to host memory happens here: a
        thread writes the files while training goes on (the next save, a load, or
        :meth:`wait_for_checkpoint` waits for it; the checkpoint is visible only once complete).
        ``keep_last``: keep only the newest that many complete checkpoints in ``directory``.
        ``client_state``: JSON-serialisable state of the caller's (a sampler's position, ...), given
        back as ``engine.client_state`` by :meth:`load_checkpoint`."""
        from tidal.train import checkpoint

        self.wait_for_checkpoint()
        self._pending_save = checkpoint.save(self, directory, tag, background=async_save, keep_last=keep_last,
                                             client_state=client_state)
        return self._pending_save.path

    def checkpoint_pending(self) -> bool:
        """Whether this rank is still writing the last asynchronous save (does not block)."""
        return self._pending_save is not None and not self._pending_save.done()

    def wait_for_checkpoint(self) -> str | None:
        """Blocks until this rank's part of the last asynchronous save is written (rank 0: the whole
        checkpoint is in place) and re-raises its error; the path, or None with no save pending."""
        pending, self._pending_save = self._pending_save, None
        return None if pending is None else pending.wait()

    def load_checkpoint(self, directory: str, tag: str | None = None) -> str:
        """Collective: restores a checkpoint saved at any world size, stage and ``moe.ep_size``
        (``latest`` by default); its ``client_state`` is then ``engine.client_state``."""
        from tidal.train import checkpoint

        self.wait_for_checkpoint()
        return checkpoint.load(self, directory, tag)

    def copy_weights_to(self, target: torch.nn.Module) -> None:
        """Writes the weights the training forward uses (the compute dtype's copy of the master
        weights) into ``target``'s parameters of the same names, cast to their dtype. At stage 3 this
        is collective and goes module by module: each group of parameters is gathered, copied and
        freed, the next group's gather in flight, so no rank ever holds the whole model gathered."""
        dest = dict(target.named_parameters())
        if self.experts is not None:  # each rank holds a slice of the experts: assemble them whole
            state = self.full_state_dict()
            with torch.no_grad():
                for name, param in dest.items():
                    param.copy_(state[name].to(self.compute_dtype))
            return
        own = {id(p): name for name, p in self.module.named_parameters()}
        missing = sorted(set(own.values()) - set(dest))
        if missing:
            raise ValueError(f"copy_weights_to: target has no parameter {missing[0]!r} "
                             f"({len(missing)} of the module's parameters missing)")
        if self.gatherer is not None:
            self.gatherer.copy_into(lambda slot: dest[own[id(slot.param)]])
            return
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                dest[name].copy_(param)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the full fp32 weights on every rank, keyed like ``module.state_dict()``."""
        full = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=self.device)
        if self.stage == 0 or self.world_size == 1:
            full.copy_(self.master)
        else:
            comm.all_gather(full, self.master.to(self.device))
        by_param = {id(s.param): full[s.offset:s.offset + s.numel].view(s.shape).clone() for s in self.slots}
        if self.experts is not None:  # each ep group's slices, concatenated along the expert dimension
            mine = self.experts.full_weights()
            for s in self.experts.slots:
                local = mine[s.offset:s.offset + s.numel]
                gathered = torch.empty(self.ep_size * s.numel, dtype=torch.float32, device=self.device)
                comm.all_gather(gathered, local.contiguous(), group=self.ep_group)
                by_param[id(s.param)] = gathered.view(self.ep_size * s.shape[0], *s.shape[1:])
        return {name: by_param.get(id(t), t.detach().clone())
                for name, t in self.module.state_dict(keep_vars=True).items()}


def _ops():
    import tidal.ops

    return tidal.ops


def _fused_adam_on(device: torch.device) -> bool:
    """Whether ``adam_step_`` has a kernel for ``device`` in this build."""
    if device.type == "cpu":
        return True
    from tidal.serve.config import gpu_available

    return device.type == "cuda" and gpu_available()


def initialize(model: torch.nn.Module, config, *, collective_timeout: float | None = None) -> Engine:
    """Wraps ``model`` for training with a DeepSpeed-style ``config`` (a dict or a JSON path).

    Under ``torchrun`` the process group comes from the environment (Gloo for CPU models, NCCL for
    CUDA ones); a single process needs no launcher. ``collective_timeout`` (seconds; default
    ``TIDAL_COLLECTIVE_TIMEOUT_S``, else torch's 30 minutes): a collective a peer does not join within
    it raises tidal.train.comm.CollectiveError naming it, where it would otherwise hang.
    """
    comm.init(next(model.parameters()).device, collective_timeout)
    return Engine(model, load_config(config, world_size=comm.world_size()))
