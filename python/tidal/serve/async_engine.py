"""The asynchronous engine behind the server: many concurrent callers, one engine loop.

Callers ``await``-iterate ``generate()`` and receive a RequestOutput (cumulative text and tokens)
each time their request advances. The loop runs ``LLMEngine.step`` on one worker thread (the model
forward releases the GIL, so the event loop stays responsive), and applies new requests and aborts
between steps, so the engine is only ever touched by one thread at a time. A request that fails ends
with finish_reason "error" and a message; the loop keeps serving the others.
"""

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator

import torch

from tidal.serve.engine import EngineConfig, LLMEngine
from tidal.serve.outputs import RequestOutput
from tidal.serve.sampling_params import SamplingParams


class AsyncLLMEngine:
    """``stream``: a CUDA stream the engine's steps run on (engines sharing a GPU in one process
    each take their own, so their work overlaps and a priority can favour one); None runs them on
    the worker thread's default."""

    def __init__(self, engine: LLMEngine, stream=None):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple] = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # the current CUDA stream is per thread: the worker's is set once, every step runs on it
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidal-engine",
            initializer=None if stream is None else torch.cuda.set_stream, initargs=() if stream is None else (stream,))
        self._ids = itertools.count()
        self._stepping = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    # ---- public ----------------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output each time it advances; the last one has ``finished`` set.

        Bad input raises ValueError before anything is queued. Leaving the iteration early (a
        client that disconnects, a cancelled task) aborts the request and frees its blocks.
        """
        params = sampling_params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request_id={request_id!r} is already in use")
        processed = self.engine.process_prompt(prompt, params)
        if kv_transfer_params is not None:
            self.engine.check_transfer_params(kv_transfer_params, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, processed, params, priority, kv_transfer_params))
        self._ensure_loop()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Aborts a request (a no-op for an unknown or finished one); applied between steps."""
        self._queues.pop(request_id, None)
        self._pending_aborts.append(request_id)
        self._ensure_loop()

    def stats(self) -> dict:
        return self.engine.stats()

    @property
    def num_pending(self) -> int:
        return len(self._queues)

    async def shutdown(self) -> None:
        """Aborts everything in flight, stops the loop and waits for the worker thread."""
        for request_id in list(self._queues):
            await self.abort(request_id)
        while self._pending_aborts or self._stepping:
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self.engine.close()
        self._executor.shutdown(wait=True)

    # ---- the loop --------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _apply_pending(self) -> None:
        while self._pending_aborts:
            self.engine.abort_request(self._pending_aborts.pop(0))
        while self._pending_adds:
            request_id, processed, params, priority, kv_transfer_params = self._pending_adds.pop(0)
            queue = self._queues.get(request_id)
            if queue is None:  # aborted before it started
                continue
            try:
                self.engine.add_request(request_id, processed, params, priority, kv_transfer_params)
            except Exception as e:
                queue.put_nowait(e)
                self._queues.pop(request_id, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                if self.engine.has_pending_transfers:  # blocks held for a decode engine: keep polling
                    self.engine.poll_transfers()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=0.005)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await self._wakeup.wait()
                continue
            self._stepping = True
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as e:  # a bug, not a request's fault: fail everyone in flight, keep serving
                outputs = []
                for request_id, queue in list(self._queues.items()):
                    queue.put_nowait(RuntimeError(f"the engine step failed: {type(e).__name__}: {e}"))
                    self._queues.pop(request_id, None)
                    self._pending_aborts.append(request_id)
            finally:
                self._stepping = False
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
                    if output.finished:
                        self._queues.pop(output.request_id, None)
            await asyncio.sleep(0)  # let callers run between steps
