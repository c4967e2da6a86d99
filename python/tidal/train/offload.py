"""ZeRO-Offload on one rank, overlapped with the backward pass.

During the backward pass of a step's last micro-batch, each chunk of the flat gradient buffer is
final as soon as every parameter in it has its gradient (the engine's fold hooks add them into the
fp32 accumulator). From then on it is handled by this pipeline:

- its copy to the pinned host buffer is queued at once on a side stream (on a GPU), behind the
  kernels that produced it and ahead of the rest of the backward pass;
- when the step needs no global quantity (no gradient clipping, no fp16 overflow check), a host
  thread waits for the copy, steps the chunk with the C++ Adam right away and sends the updated
  weights back on the side stream, while the GPU runs the rest of the backward pass;
- otherwise ``engine.step()`` computes the global norm on the device as without the pipeline (so
  the weights are the same bit for bit) and steps each chunk as soon as its copy has landed (most
  have by then), sending it back at once.

A chunk is stepped early only from the second step on, once the first has shown that every
parameter receives its gradient once per backward pass (a parameter used by two reentrant
checkpoints would fire its hook twice: its chunk is then copied again at the end, never stepped
early). The parameters of an early-stepped chunk change during the backward pass; every use the
backward pass makes of them is behind it by then (a gradient is final only after its parameter's
last use). ``engine.step()`` joins the host thread and completes the step.
"""

import queue
import threading

import torch


class OverlappedOffload:
    """Owns the chunk bookkeeping, the side stream and the host thread of one engine (one rank,
    stages 0-2, ``offload_optimizer``)."""

    def __init__(self, engine):
        self.engine = engine
        lo, hi = engine.owned
        if (lo, hi) != (0, engine.grad_accum.numel()):
            raise ValueError("OverlappedOffload needs the whole flat buffer owned (one rank)")
        self.chunk_size = None
        self.on_gpu = engine.device.type == "cuda"
        self.stream = torch.cuda.Stream(engine.device) if self.on_gpu else None
        if self.on_gpu and engine.host_grad is None:
            engine.host_grad = torch.empty(hi, dtype=torch.float32, pin_memory=True)
        self.active = False
        self.step_early_ok = False  # set after a step showed each parameter firing once
        self.stepping_early = False
        self.stepped = False
        self.worker = None
        self.error = None
        for index, s in enumerate(engine.slots):
            s.param.register_post_accumulate_grad_hook(self._make_hook(index))

    @property
    def host_grad(self) -> torch.Tensor:
        return self.engine.host_grad if self.on_gpu else self.engine.grad_accum

    # ---- the backward pass ---------------------------------------------------------------------

    def _layout(self, size: int) -> None:
        """Chunks of ``size`` elements (the engine's offload_chunk) over the flat buffer and, per
        parameter, the chunks its range overlaps."""
        n = self.engine.grad_accum.numel()
        self.chunk_size = size
        self.chunks = [(c, min(n, c + size)) for c in range(0, n, size)]
        self.slot_chunks = [list(range(s.offset // size, (s.offset + max(s.numel, 1) - 1) // size + 1))
                            for s in self.engine.slots]
        self.members = [0] * len(self.chunks)
        for chunks in self.slot_chunks:
            for c in chunks:
                self.members[c] += 1

    def begin(self, step_early: bool, adam: dict, publish) -> None:
        """Arms the pipeline for the backward pass about to run (a step's last micro-batch)."""
        if self.chunk_size != self.engine.offload_chunk:
            self._layout(self.engine.offload_chunk)
        self.left = list(self.members)
        self.fired = [0] * len(self.engine.slots)
        self.dispatched = [False] * len(self.chunks)
        self.events: list = [None] * len(self.chunks)  # per chunk: its copy's event (GPU)
        self.refire: set[int] = set()
        self.stepping_early = step_early and self.step_early_ok
        self.adam, self.publish = adam, publish
        self.stepped = False
        self.error = None
        self.worker = None
        if self.stepping_early:
            self.queue = queue.SimpleQueue()
            self.worker = threading.Thread(target=self._run, name="tidal-offload", daemon=True)
            self.worker.start()
        self.active = True

    def _make_hook(self, index: int):
        def hook(param: torch.nn.Parameter) -> None:
            if not self.active:
                return
            self.fired[index] += 1
            for c in self.slot_chunks[index]:
                if self.fired[index] > 1:
                    if self.dispatched[c]:
                        self.refire.add(c)
                    continue
                self.left[c] -= 1
                if self.left[c] == 0:
                    self._dispatch(c)
        return hook

    def _dispatch(self, c: int) -> None:
        self.dispatched[c] = True
        lo, hi = self.chunks[c]
        event = None
        if self.on_gpu:
            ready = torch.cuda.current_stream(self.engine.device).record_event()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                self.host_grad[lo:hi].copy_(self.engine.grad_accum[lo:hi], non_blocking=True)
                event = self.stream.record_event()
        self.events[c] = event
        if self.worker is not None:
            self.queue.put((c, event))

    def abort(self) -> None:
        """After a failed backward pass: stops the host thread; the engine's step state is untouched
        unless chunks were already stepped early (then the error says so)."""
        if not self.active:
            return
        if self.worker is not None:
            self.queue.put(None)
            self.worker.join()
        self.active = False
        if self.on_gpu:
            self.stream.synchronize()

    def end_backward(self) -> None:
        """After the backward pass: dispatches the chunks some parameter of which got no gradient
        (their gradient is zero there), and lets the host thread finish."""
        for c in reversed(range(len(self.chunks))):
            if not self.dispatched[c]:
                self._dispatch(c)
        if self.worker is not None:
            self.queue.put(None)

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                c, event = item
                if event is not None:
                    event.synchronize()
                if self.stepping_early:
                    self._step_chunk(c)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by finish()
            self.error = e
            while self.queue.get() is not None:  # drain, so end_backward never blocks
                pass

    def _step_chunk(self, c: int) -> None:
        from tidal.train.engine import _adam_update

        lo, hi = self.chunks[c]
        e = self.engine
        _adam_update(e.master[lo:hi], self.host_grad[lo:hi], e.exp_avg[lo:hi], e.exp_avg_sq[lo:hi], **self.adam)
        if self.publish is not None:
            if self.on_gpu:
                with torch.cuda.stream(self.stream):
                    self.publish(lo, hi, e.master[lo:hi])
            else:
                self.publish(lo, hi, e.master[lo:hi])

    # ---- the step ------------------------------------------------------------------------------

    def finish(self) -> bool:
        """At the step: joins the host thread (when it stepped the chunks) and orders the compute
        stream after the side stream. Returns whether the chunks were stepped; otherwise the host
        gradients are in place, or on their way (``events``), for the engine to step."""
        if not self.active:
            return False
        if self.worker is not None:
            self.worker.join()
        self.active = False
        if self.error is not None:
            raise self.error
        if self.refire and self.stepping_early:
            raise RuntimeError(f"a parameter's gradient arrived in two parts during the backward pass (chunks "
                               f"{sorted(self.refire)}) after its chunk was stepped: use one backward pass per "
                               "parameter use pattern, or set gradient_clipping to step after the backward pass")
        if self.refire:  # a gradient arrived in two parts after its chunk was copied: copy again
            for c in sorted(self.refire):
                lo, hi = self.chunks[c]
                if self.on_gpu:
                    with torch.cuda.stream(self.stream):
                        self.stream.wait_stream(torch.cuda.current_stream(self.engine.device))
                        self.host_grad[lo:hi].copy_(self.engine.grad_accum[lo:hi], non_blocking=True)
                        self.events[c] = self.stream.record_event()
        if self.on_gpu and self.stepping_early:  # the next forward reads the published weights
            torch.cuda.current_stream(self.engine.device).wait_stream(self.stream)
        self.step_early_ok = all(f <= 1 for f in self.fired)
        self.stepped = self.stepping_early
        return self.stepped

    def before_gradients_change(self) -> None:
        """Orders the compute stream after the side stream's copies (GPU work only, no host wait):
        called before anything writes the gradient buffer again (engine.step() zeroes it)."""
        if self.on_gpu:
            torch.cuda.current_stream(self.engine.device).wait_stream(self.stream)
