"""``zero_optimization.overlap_comm`` below stage 3: the gradients' reduction starts during the
backward pass of the accumulation boundary's micro-batch, bucket by bucket, as soon as every gradient
in a bucket is final, instead of after the backward pass. Stage 2 reduce-scatters the plan's buckets
(the same local range ``[lo, hi)`` of every rank's shard of the flat gradient buffer); stages 0 and 1
all-reduce, in place, the flat buffer's ranges of ``reduce_bucket_size`` elements.

A bucket counts the parameters that overlap it; each parameter's post-accumulate hook (registered
after the one that folds a 16-bit gradient into the fp32 accumulator) counts it down. Buckets are
launched strictly from the last to the first, a bucket only once it and every later one are
complete, so every rank issues the same collectives in the same order whatever order its backward
pass produced the gradients in; the buckets still open when the backward pass ends are launched at
the step. Each bucket is the same collective over the same values as without overlap (which reduces
by the same buckets), so the results are equal bit for bit. The collectives run asynchronously
(Gloo's own threads on the CPU, NCCL's stream on GPUs) and are waited for at the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tidal.train.comm import CollectiveError


def all_reduce_buckets(padded: int, bucket_numel: int, alignment: int) -> list[tuple[int, int]]:
    """Stages 0 and 1: consecutive ranges of the flat buffer, ``bucket_numel`` elements each
    (rounded up to ``alignment``), the last one shorter."""
    step = max(-(-int(bucket_numel) // alignment) * alignment, alignment)
    return [(lo, min(lo + step, padded)) for lo in range(0, padded, step)]


class OverlappedReduction:
    """The reduction of ``engine.grad_accum`` overlapped with the boundary's backward pass: stage 2's
    reduce-scatter of ``engine.plan.buckets``, or (``all_reduce_buckets`` given, stages 0 and 1) the
    in-place all-reduce of those flat ranges."""

    def __init__(self, engine, all_reduce_buckets: list[tuple[int, int]] | None = None):
        self.engine = engine
        plan, size = engine.plan, engine.world_size
        self.shard = plan.shard_numel
        self.all_reduce = all_reduce_buckets is not None
        self.buckets = list(all_reduce_buckets) if self.all_reduce else [tuple(b) for b in plan.buckets]
        self.slot_buckets: list[list[int]] = []
        for s in engine.slots:
            ids = set()
            # the ranges of the slot in each bucket's coordinates: the flat buffer's, or each shard's
            spans = [(s.offset, s.offset + s.numel)] if self.all_reduce else \
                [(max(s.offset, r * self.shard) - r * self.shard, min(s.offset + s.numel, (r + 1) * self.shard) -
                  r * self.shard) for r in range(size)]
            for la, lb in spans:
                if la < lb:
                    ids.update(k for k, (lo, hi) in enumerate(self.buckets) if lo < lb and la < hi)
            self.slot_buckets.append(sorted(ids))
        self.counts = [0] * len(self.buckets)
        for ids in self.slot_buckets:
            for k in ids:
                self.counts[k] += 1
        self.active = False
        self.remaining: list[int] = []
        self.next = -1
        self.handles: list = []
        self.out: torch.Tensor | None = None
        for i, s in enumerate(engine.slots):
            s.param.register_post_accumulate_grad_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(_param) -> None:
            if self.active:
                for k in self.slot_buckets[index]:
                    self.remaining[k] -= 1
                self._launch_ready()
        return hook

    def begin(self) -> None:
        """Before the boundary micro-batch's backward pass."""
        self.remaining = list(self.counts)
        self.next = len(self.buckets) - 1
        self.handles = []
        accum = self.engine.grad_accum
        self.out = accum if self.all_reduce else torch.empty(self.shard, dtype=accum.dtype, device=accum.device)
        self.active = True
        self._launch_ready()  # buckets no parameter overlaps (padding) go at once

    def _launch_ready(self) -> None:
        while self.next >= 0 and self.remaining[self.next] <= 0:
            self._launch(self.next)
            self.next -= 1

    def _launch(self, k: int) -> None:
        lo, hi = self.buckets[k]
        name = "all_reduce" if self.all_reduce else "reduce_scatter"
        try:
            if self.all_reduce:  # in place: the bucket's gradients are final
                inp = self.out[lo:hi]
                handle = dist.all_reduce(inp, async_op=True)
            else:
                by_rank = self.engine.grad_accum.view(self.engine.world_size, self.shard)
                inp = by_rank[:, lo:hi].contiguous()  # the bucket's gradients are final: a snapshot of them
                handle = dist.reduce_scatter_tensor(self.out[lo:hi], inp.reshape(-1), async_op=True)
        except (RuntimeError, dist.DistError) as e:
            raise CollectiveError(f"collective {name} (bucket {k}) over {self.engine.world_size} ranks "
                                  f"failed: {e}") from e
        self.handles.append((handle, inp))

    def finish(self, divisor: int) -> torch.Tensor:
        """At the step: the buckets still open, then every bucket's result; the owned shard's gradient."""
        self.active = False
        while self.next >= 0:
            self._launch(self.next)
            self.next -= 1
        self._wait()
        out, self.out = self.out, None
        if self.all_reduce:
            lo, hi = self.engine.owned
            out = out[lo:hi]
        return out.div_(divisor) if divisor != 1 else out

    def cancel(self) -> None:
        """Drops the overlapped results (their collectives complete first, so every rank stays in step)."""
        if self.active or self.handles:
            self.active = False
            while self.next >= 0:
                self._launch(self.next)
                self.next -= 1
            self._wait()
            self.out = None

    def _wait(self) -> None:
        handles, self.handles = self.handles, []
        for handle, _ in handles:
            try:
                handle.wait()
            except (RuntimeError, dist.DistError) as e:
                name = "all_reduce" if self.all_reduce else "reduce_scatter"
                raise CollectiveError(f"collective {name} over {self.engine.world_size} ranks failed: {e}") from e

    @property
    def pending(self) -> bool:
        return self.out is not None
