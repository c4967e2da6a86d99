"""ZeRO stage 3: parameters live only as each rank's shard of the flat buffer; a module's parameters
are all-gathered just before its forward (and again before its backward), the next module in the
recorded order is prefetched asynchronously, and the gathered copies are freed right after use.

Gradients leave the parameters as soon as autograd has accumulated them (a post-accumulate-grad hook
adds each one to the engine's fp32 flat accumulator and drops ``.grad``), so a module's gathered
weights are freed once all of its parameters have their gradients.
"""

import torch

from tidal.train import comm


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
        self.pending = None  # (work handle, receive buffer) of an asynchronous gather in flight
        self.buffer = None  # the gathered flat range while the parameters are live
        self.grads_left = 0  # parameters of this group still waiting for their gradient


class ParameterGatherer:
    """Installs the stage-3 hooks on the modules of ``module_groups`` and owns the gathered buffers.

    ``part`` is what is partitioned: the engine itself (every parameter but the experts of an
    expert-parallel model, over all ranks) or its expert partition (the experts this rank's slice
    holds, over the ranks holding the same slice). It provides ``plan``, ``slots``, ``flat_shard``
    (this rank's shard in the compute dtype), ``grad_accum``, ``compute_dtype`` and ``device``;
    ``rank`` and ``size`` are this rank's place in, and the size of, ``group`` (None: every rank)."""

    def __init__(self, part, module_groups: dict, rank: int, size: int, group=None):
        self.part = part
        self.world_size, self.group = size, group
        self.empty = torch.empty(0, dtype=part.compute_dtype, device=part.device)
        self.groups = [_Group(i, info, [part.slots[j] for j in range(info.param_begin, info.param_end)], rank)
                       for i, info in enumerate(part.plan.groups)]
        self.order: list[int] = []  # group gather order recorded during the first forward
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
            if self.recording and g not in self.order:
                self.order.append(g)
            self._finish(self.groups[g])
        if not self.recording and group_ids:  # prefetch the group recorded after the last one
            position = self.order.index(group_ids[-1]) if group_ids[-1] in self.order else -1
            if 0 <= position < len(self.order) - 1:
                self._start(self.groups[self.order[position + 1]])

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
        return hook

    def _make_grad_hook(self, group: _Group, slot):
        def hook(param):
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
