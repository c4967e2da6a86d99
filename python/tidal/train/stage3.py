"""ZeRO stage 3: parameters live only as each rank's shard of the flat buffer; a module's parameters
are all-gathered just before its forward (and again before its backward), and the gathered copies
are freed right after use.

Prefetch: once the first backward pass has fixed the order in which modules run, using a module
starts the all-gathers of the modules that come next (in forward order during the forward pass, in
reverse during the backward pass, activation checkpointing's recomputations included) until
``stage3_prefetch_bucket_size`` elements are ahead, never taking more than
``stage3_max_live_parameters`` gathered or in flight (the module needed now is always gathered).
The gathers are asynchronous collectives (Gloo's threads on the CPU, NCCL's stream on GPUs, ordered
with the compute stream by events, with no device-wide synchronisation).

Gradients leave the parameters as soon as autograd has accumulated them (a post-accumulate-grad hook
drops ``.grad``), so a module's gathered weights are freed once all of its parameters have their
gradients. On one rank each gradient is added to the engine's fp32 accumulator. On several ranks
(:class:`GradientReducer`) gradients are partitioned as DeepSpeed's stage 3 partitions them: every
micro-batch's gradients are staged in fp32 by buckets of modules (consecutive in the backward order
and in the flat buffer, up to ``reduce_bucket_size`` elements), each bucket is reduce-scattered as
soon as its last gradient arrives, and each rank adds only its own part to an accumulator the size
of its shard. With ``overlap_comm`` the reduce-scatters run while the backward pass goes on (waited
for only to bound the memory in flight, and at the end of the pass); without it each one completes
before the backward pass continues. Either way the values are the same.
"""

import torch
import torch.distributed as dist

from tidal.train import comm
from tidal.train.comm import CollectiveError


class _Group:
    """One gather group: the parameters a module owns directly, a contiguous flat range."""

    def __init__(self, index: int, info, slots: list, rank: int):
        self.index = index
        self.flat_begin, self.flat_end = info.flat_begin, info.flat_end
        self.slots = slots
        # per rank (in rank order) the shard-local part of this group's range; chunk = the largest part
        self.parts = [(s.rank, s.shard_begin, s.shard_end) for s in info.shards]
        self.chunk = max((e - b for _, b, e in self.parts), default=0)
        self.own = next(((b, e) for r, b, e in self.parts if r == rank), None)
        self.numel = self.flat_end - self.flat_begin
        self.pending = None  # (work handle, receive buffer) of an asynchronous gather in flight
        self.buffer = None  # the gathered flat range while the parameters are live
        self.grads_left = 0  # parameters of this group still waiting for their gradient


class ParameterGatherer:
    """Installs the stage-3 hooks on the modules of ``module_groups`` and owns the gathered buffers.

    ``part`` is what is partitioned: the engine itself (every parameter but the experts of an
    expert-parallel model, over all ranks) or its expert partition (the experts this rank's slice
    holds, over the ranks holding the same slice). It provides ``plan``, ``slots``, ``flat_shard``
    (this rank's shard in the compute dtype), ``grad_accum``, ``compute_dtype`` and ``device``;
    ``rank`` and ``size`` are this rank's place in, and the size of, ``group`` (None: every rank).
    ``prefetch_numel`` and ``max_live_numel``: ``stage3_prefetch_bucket_size`` and
    ``stage3_max_live_parameters``. ``reducer``: a :class:`GradientReducer` that takes the gradients
    (None: they are added to ``part.grad_accum``)."""

    def __init__(self, part, module_groups: dict, rank: int, size: int, group=None,
                 prefetch_numel: int = 50_000_000, max_live_numel: int = 1_000_000_000):
        self.part = part
        self.world_size, self.group = size, group
        self.prefetch_numel, self.max_live_numel = int(prefetch_numel), int(max_live_numel)
        self.live_numel = 0  # elements of the groups gathered or in flight
        self.peak_live_numel = 0
        self.backward_phase = False  # set by the engine around a backward pass: prefetch goes in reverse
        self.reducer = None
        self.empty = torch.empty(0, dtype=part.compute_dtype, device=part.device)
        self.groups = [_Group(i, info, [part.slots[j] for j in range(info.param_begin, info.param_end)], rank)
                       for i, info in enumerate(part.plan.groups)]
        self.order: list[int] = []  # group gather order recorded during the first forward
        self.position: dict[int, int] = {}  # group -> index in order
        self.recording = True
        self.handles = []
        for module, group_ids in module_groups.items():
            self.handles.append(module.register_forward_pre_hook(self._make_pre_hook(group_ids)))
            self.handles.append(module.register_forward_hook(self._make_post_hook(group_ids)))
            self.handles.append(module.register_full_backward_pre_hook(self._make_backward_pre_hook(group_ids)))
        for group in self.groups:
            for slot in group.slots:
                self.handles.append(slot.param.register_post_accumulate_grad_hook(self._make_grad_hook(group, slot)))
        self.release_all()

    # ---- gathering -------------------------------------------------------------------------------

    def _start(self, group: _Group) -> None:
        """Starts the all-gather of ``group`` (no-op if live or already in flight)."""
        if group.buffer is not None or group.pending is not None:
            return
        self.live_numel += group.numel
        self.peak_live_numel = max(self.peak_live_numel, self.live_numel)
        dtype, device = self.part.compute_dtype, self.part.device
        send = torch.zeros(group.chunk, dtype=dtype, device=device)
        if group.own is not None:
            b, e = group.own
            send[:e - b].copy_(self.part.flat_shard[b:e], non_blocking=True)  # from host memory under offload_param
        recv = torch.empty(self.world_size * group.chunk, dtype=dtype, device=device)
        if comm.is_distributed() and self.world_size > 1:
            work = torch.distributed.all_gather_into_tensor(recv, send, group=self.group, async_op=True)
        else:
            recv.copy_(send)
            work = None
        group.pending = (work, recv)

    def _finish(self, group: _Group) -> None:
        """Waits for ``group``'s gather and points its parameters at the gathered range."""
        self._start(group)
        if group.buffer is not None:
            return
        work, recv = group.pending
        if work is not None:
            work.wait()
        group.pending = None
        pieces = [recv[r * group.chunk:r * group.chunk + (e - b)] for r, b, e in group.parts]
        group.buffer = torch.cat(pieces) if len(pieces) != 1 else pieces[0]
        for slot in group.slots:
            begin = slot.offset - group.flat_begin
            slot.param.data = group.buffer[begin:begin + slot.numel].view(slot.shape)

    def release(self, group: _Group) -> None:
        if group.pending is None and group.buffer is None:
            return
        self.live_numel -= group.numel
        if group.pending is not None:  # a prefetch nobody used: let it land, then drop it
            work, _ = group.pending
            if work is not None:
                work.wait()
            group.pending = None
        group.buffer = None
        for slot in group.slots:
            slot.param.data = self.empty

    def release_all(self) -> None:
        for group in self.groups:
            self.release(group)

    def gather(self, group_ids) -> None:
        for g in group_ids:
            if self.recording and g not in self.position:
                self.position[g] = len(self.order)
                self.order.append(g)
            self._finish(self.groups[g])
        self.prefetch(group_ids)

    def prefetch(self, group_ids) -> None:
        """Starts the gathers of the groups recorded after ``group_ids`` (before them during a
        backward pass) up to ``prefetch_numel`` elements ahead, within ``max_live_numel``."""
        if self.recording or not group_ids or self.prefetch_numel <= 0:
            return
        positions = [self.position[g] for g in group_ids if g in self.position]
        if not positions:
            return
        step = -1 if self.backward_phase else 1
        i, ahead = (min(positions) if self.backward_phase else max(positions)) + step, 0
        while 0 <= i < len(self.order) and ahead < self.prefetch_numel:
            group = self.groups[self.order[i]]
            if group.buffer is None and group.pending is None:
                if self.live_numel + group.numel > self.max_live_numel:
                    break
                self._start(group)
            ahead += group.numel
            i += step

    # ---- hooks -----------------------------------------------------------------------------------

    def _make_pre_hook(self, group_ids):
        def hook(module, args):
            self.gather(group_ids)
        return hook

    def _make_post_hook(self, group_ids):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                for g in group_ids:
                    self.groups[g].grads_left = len(self.groups[g].slots)
            for g in group_ids:
                self.release(self.groups[g])
        return hook

    def _make_backward_pre_hook(self, group_ids):
        def hook(module, grad_output):
            for g in group_ids:
                self._finish(self.groups[g])
            self.prefetch(group_ids)
        return hook

    def _make_grad_hook(self, group: _Group, slot):
        def hook(param):
            if self.reducer is not None:
                self.reducer.add(group.index, slot, param.grad)
            else:
                self.part.grad_accum[slot.offset:slot.offset + slot.numel].add_(param.grad.reshape(-1).float())
            param.grad = None
            group.grads_left -= 1
            if group.grads_left <= 0:
                self.release(group)
        return hook

    def copy_into(self, destination) -> None:
        """Gathers every group in turn, in the recorded forward order with the next group's gather in
        flight, and copies each gathered parameter into ``destination(slot)`` (a tensor of its shape)
        before freeing the group: at most two groups are live at once (collective)."""
        order = self.order + [g for g in range(len(self.groups)) if g not in self.order]
        with torch.no_grad():
            for i, g in enumerate(order):
                group = self.groups[g]
                live = group.buffer is not None
                self._finish(group)
                if i + 1 < len(order):
                    self._start(self.groups[order[i + 1]])
                for slot in group.slots:
                    destination(slot).copy_(slot.param.data)
                if not live:
                    self.release(group)

    def end_of_forward_pass(self) -> None:
        """Called after the first backward: the recorded order is complete."""
        self.recording = False


class _Bucket:
    """Consecutive groups of the backward order whose flat ranges are adjacent: ``[begin, end)``."""

    def __init__(self, groups: list[_Group]):
        self.groups = groups
        self.begin = min(g.flat_begin for g in groups)
        self.end = max(g.flat_end for g in groups)
        self.count = sum(len(g.slots) for g in groups)  # gradients that complete the bucket


class GradientReducer:
    """Stage 3's partitioned gradients over ``size`` ranks (see the module docstring): ``accum`` is
    the fp32 sum of this rank's shard of the gradients over ranks and micro-batches.

    Buckets are formed from the gatherer's recorded order, reversed (the order a backward pass
    produces gradients in), and launched strictly in that order, a bucket only once it and every
    earlier one are complete, so every rank issues the same reduce-scatters in the same order
    whatever order its backward pass produced the gradients in; the buckets still open when the
    pass ends (parameters that got no gradient) are launched then."""

    def __init__(self, gatherer: ParameterGatherer, shard_numel: int, rank: int, size: int, bucket_numel: int,
                 overlap: bool):
        self.gatherer, self.shard, self.rank, self.size = gatherer, shard_numel, rank, size
        self.bucket_numel, self.overlap = max(int(bucket_numel), 1), overlap
        part = gatherer.part
        self.accum = torch.zeros(shard_numel, dtype=torch.float32, device=part.device)
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[int, int] = {}
        self._order_key: tuple | None = None
        self.remaining: list[int] = []
        self.staged: dict[int, torch.Tensor] = {}  # bucket -> its fp32 gradients so far, [begin, end)
        self.next = 0  # the next bucket to launch
        self.in_flight: list = []  # (work, out, own range, input) in launch order
        self.in_flight_numel = 0
        self.active = False
        self.launched = 0  # reduce-scatters issued (for tests and the profile)

    def _plan(self) -> None:
        order = self.gatherer.order
        key = tuple(order)
        if key == self._order_key:
            return
        groups = self.gatherer.groups
        seen = set(order)
        sequence = [groups[g] for g in reversed(order)] + [g for g in groups if g.index not in seen]
        self.buckets, current = [], []
        for group in sequence:
            if not group.slots:
                continue
            if current and (group.flat_end != current[-1].flat_begin or
                            sum(g.numel for g in current) + group.numel > self.bucket_numel):
                self.buckets.append(_Bucket(current))
                current = []
            current.append(group)
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {g.index: k for k, b in enumerate(self.buckets) for g in b.groups}
        self._order_key = key

    def begin(self) -> None:
        """Before a backward pass."""
        self._plan()
        self.remaining = [b.count for b in self.buckets]
        self.staged = {}
        self.next = 0
        self.active = True

    def add(self, group_index: int, slot, grad: torch.Tensor) -> None:
        """A parameter's gradient, from its post-accumulate hook."""
        if not self.active:  # a backward pass the engine did not start (loss.backward() by hand)
            self.begin()
        k = self.bucket_of[group_index]
        bucket = self.buckets[k]
        staged = self.staged.get(k)
        if staged is None:
            staged = self.staged[k] = torch.zeros(bucket.end - bucket.begin, dtype=torch.float32,
                                                  device=self.accum.device)
        begin = slot.offset - bucket.begin
        staged[begin:begin + slot.numel].add_(grad.reshape(-1))
        self.remaining[k] -= 1
        while self.next < len(self.buckets) and self.remaining[self.next] <= 0:
            self._launch(self.next)
            self.next += 1

    def _launch(self, k: int) -> None:
        bucket = self.buckets[k]
        staged = self.staged.pop(k, None)
        a, b = bucket.begin, bucket.end
        parts = [(r, max(a, r * self.shard), min(b, (r + 1) * self.shard)) for r in range(self.size)]
        parts = [(r, lo, hi) for r, lo, hi in parts if lo < hi]
        chunk = max(hi - lo for _, lo, hi in parts)
        inp = torch.zeros(self.size, chunk, dtype=torch.float32, device=self.accum.device)
        if staged is not None:
            for r, lo, hi in parts:
                inp[r, :hi - lo].copy_(staged[lo - a:hi - a])
        out = torch.empty(chunk, dtype=torch.float32, device=self.accum.device)
        own = next(((lo - r * self.shard, hi - r * self.shard) for r, lo, hi in parts if r == self.rank), None)
        try:
            work = dist.reduce_scatter_tensor(out, inp.reshape(-1), group=self.gatherer.group, async_op=True)
        except (RuntimeError, dist.DistError) as e:
            raise CollectiveError(f"collective reduce_scatter (stage-3 gradient bucket {k}) over {self.size} "
                                  f"ranks failed: {e}") from e
        self.launched += 1
        self.in_flight.append((work, out, own, inp))
        self.in_flight_numel += inp.numel()
        if not self.overlap:
            self._wait(0)
        else:  # bound the gradients in flight: two buckets' worth
            self._wait(2 * self.size * self.bucket_numel)

    def _wait(self, keep_numel: int) -> None:
        """Completes the oldest reduce-scatters until at most ``keep_numel`` elements are in flight."""
        while self.in_flight and self.in_flight_numel > keep_numel:
            work, out, own, inp = self.in_flight.pop(0)
            self.in_flight_numel -= inp.numel()
            try:
                work.wait()
            except (RuntimeError, dist.DistError) as e:
                raise CollectiveError(f"collective reduce_scatter (stage-3 gradients) over {self.size} ranks "
                                      f"failed: {e}") from e
            if own is not None:
                lo, hi = own
                self.accum[lo:hi].add_(out[:hi - lo])

    def end_backward(self) -> None:
        """After a backward pass: the buckets still open, then every result into ``accum``."""
        if not self.active:
            return
        self.active = False
        while self.next < len(self.buckets):
            self._launch(self.next)
            self.next += 1
        self._wait(0)
        self.staged = {}

    def cancel(self) -> None:
        """After a failed backward pass: its collectives complete (every rank stays in step), and
        the partial gradients of that pass are still added (as they are on one rank)."""
        self.end_backward()
