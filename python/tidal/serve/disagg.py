"""The engine's side of disaggregated serving: a prefill engine computes prompts and keeps their KV
blocks for a decode engine, which reads them into blocks of its own pool and generates.

- Prefill (``kv_role="prefill"``): a request added with ``kv_transfer_params={"do_remote_decode":
  True}`` runs as usual (the router asks for ``max_tokens=1``); when its first token is sampled,
  its blocks are held by the scheduler under a hold id and published to the connector, and the
  request's output carries ``kv_transfer_params``: the transfer id, this engine's connector info,
  the block ids, the prompt's token ids, the first token (with its log-probs) and the sampling
  seed. The hold ends when a decode engine has read the blocks, when the first token stopped the
  request (nothing to decode), or after ``kv_transfer_timeout`` seconds.
- Decode (``kv_role="decode"``): a request added with those params waits outside the scheduler:
  blocks are reserved for its prompt, the connector reads the prefill engine's blocks into them,
  then the scheduler takes it as running with the prompt computed and the first token as its first
  output; it is scheduled from that token on, sampling with the same seed, so its tokens equal what
  one engine would have produced. A read that fails or a request that waits past the timeout ends
  with an error; blocks are never leaked.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

from tidal.serve.kv_transfer import KVTransferError, make_connector

ROLES = ("prefill", "decode")


@dataclass
class _Hold:
    hold_id: int
    deadline: float


@dataclass
class _Incoming:
    seq: object
    params: dict
    priority: int
    deadline: float
    state: str = "new"  # new -> reading -> ready; "abandoned" while a read of an aborted request ends


class KVTransfers:
    """Holds (prefill) or incoming requests (decode) of one engine, and its connector."""

    def __init__(self, engine, config):
        if config.kv_role not in ROLES:
            raise ValueError(f"kv_role={config.kv_role!r} must be None, 'prefill' or 'decode'")
        self.engine, self.role = engine, config.kv_role
        self.timeout = config.kv_transfer_timeout
        self.engine_id = f"{self.role}-{uuid.uuid4().hex[:12]}"
        self.connector = make_connector(config.kv_connector, engine.runner.kv_pool, engine.model, config.block_size,
                                        self.engine_id, self.timeout, self.role, config.kv_host, config.kv_port)
        self.block_size = config.block_size
        self._holds: dict[str, _Hold] = {}
        self._hold_ids = itertools.count(1)
        self._incoming: dict[int, _Incoming] = {}  # seq id -> state, in arrival order
        self._reading: dict[str, int] = {}  # transfer id -> seq id

    @property
    def pending(self) -> bool:
        """Blocks held for a decode engine, or requests waiting for their KV."""
        return bool(self._holds or self._incoming)

    # ---- prefill ----------------------------------------------------------------------------------

    def hold(self, seq, token_id: int, logprobs: dict | None) -> None:
        """Before the step's update frees a remote-decode request's blocks: hold and publish them."""
        engine, request = self.engine, seq.request
        transfer_id = uuid.uuid4().hex
        hold_id = -next(self._hold_ids)
        table = engine.scheduler.hold_blocks(seq.seq_id, hold_id)
        n = len(request.prompt_token_ids)
        blocks = list(table[:-(-n // self.block_size)])
        self.connector.publish(transfer_id, blocks)
        self._holds[transfer_id] = _Hold(hold_id, time.monotonic() + self.timeout)
        request.kv_hold = transfer_id
        request.kv_transfer_params = {
            "transfer_id": transfer_id, "engine": self.connector.info(), "block_ids": blocks,
            "num_computed_tokens": n, "prompt_token_ids": list(request.prompt_token_ids), "first_token": int(token_id),
            "first_logprobs": None if logprobs is None else {str(k): float(v) for k, v in logprobs.items()},
            "seed": seq.sampling.seed}

    def release(self, transfer_id: str) -> None:
        hold = self._holds.pop(transfer_id, None)
        if hold is not None:
            self.connector.unpublish(transfer_id)
            self.engine.scheduler.release_blocks(hold.hold_id)

    def on_finish(self, request, reason: str) -> None:
        """A prefill request ended: a stop means nothing to decode, so its hold goes now."""
        if getattr(request, "kv_hold", None) is not None and reason != "length":
            self.release(request.kv_hold)
            request.kv_transfer_params = None

    # ---- decode -----------------------------------------------------------------------------------

    def check_params(self, params: dict) -> None:
        needed = ("transfer_id", "engine", "block_ids", "num_computed_tokens", "prompt_token_ids", "first_token")
        missing = [k for k in needed if k not in params]
        if missing:
            raise ValueError(f"kv_transfer_params lacks {missing}: pass a prefill engine's kv_transfer_params unchanged")
        n, blocks = int(params["num_computed_tokens"]), params["block_ids"]
        if n != len(params["prompt_token_ids"]) or len(blocks) != -(-n // self.block_size):
            raise ValueError(f"kv_transfer_params: {len(blocks)} blocks for num_computed_tokens={n} and a "
                             f"{len(params['prompt_token_ids'])}-token prompt with block_size={self.block_size}")
        engine = params["engine"]
        if not isinstance(engine, dict) or engine.get("kind") != self.connector.kind:
            raise ValueError(f"kv_transfer_params come from a {engine.get('kind') if isinstance(engine, dict) else '?'!r} "
                             f"connector; this engine's is {self.connector.kind!r}")

    def add(self, seq, params: dict, priority: int) -> None:
        self._incoming[seq.seq_id] = _Incoming(seq, params, priority, time.monotonic() + self.timeout)

    def abort(self, seq_id: int) -> None:
        entry = self._incoming.get(seq_id)
        if entry is None:
            return
        if entry.state == "reading":
            entry.state = "abandoned"  # the connector may still write its blocks: freed when the read ends
            return
        if entry.state == "ready":
            self.engine.scheduler.release_blocks(seq_id)
        del self._incoming[seq_id]

    # ---- every step -------------------------------------------------------------------------------

    def poll(self) -> set[str]:
        """Advances every transfer; returns the ids of requests whose output changed."""
        if self.role == "prefill":
            for transfer_id in self.connector.poll_done():
                self.release(transfer_id)
            now = time.monotonic()
            for transfer_id in [t for t, h in self._holds.items() if h.deadline < now]:
                self.release(transfer_id)
            return set()
        changed: set[str] = set()
        for transfer_id, error in self.connector.poll_reads():
            seq_id = self._reading.pop(transfer_id, None)
            entry = self._incoming.get(seq_id)
            if entry is None:
                continue
            if entry.state == "abandoned" or error is not None:
                self.engine.scheduler.release_blocks(seq_id)
                del self._incoming[seq_id]
                if entry.state != "abandoned":
                    changed |= self._fail(entry, error)
                continue
            entry.state = "ready"
        now = time.monotonic()
        for seq_id, entry in list(self._incoming.items()):
            if entry.state == "new":
                changed |= self._start(seq_id, entry, now)
            if entry.state == "ready":
                changed |= self._admit(seq_id, entry)
        return changed

    def _start(self, seq_id: int, entry: _Incoming, now: float) -> set[str]:
        params, scheduler = entry.params, self.engine.scheduler
        if not scheduler.reserve_blocks(seq_id, int(params["num_computed_tokens"])):
            if now > entry.deadline:
                del self._incoming[seq_id]
                return self._fail(entry, f"no KV blocks became free within kv_transfer_timeout={self.timeout} s")
            return set()
        local = scheduler.kv_cache.block_table(seq_id)
        try:
            self.connector.start_read(params["transfer_id"], params["engine"], params["block_ids"], local)
        except (KVTransferError, RuntimeError, OSError, ValueError) as e:
            scheduler.release_blocks(seq_id)
            del self._incoming[seq_id]
            return self._fail(entry, f"{type(e).__name__}: {e}")
        entry.state = "reading"
        self._reading[params["transfer_id"]] = seq_id
        return set()

    def _admit(self, seq_id: int, entry: _Incoming) -> set[str]:
        engine, params, seq = self.engine, entry.params, entry.seq
        prompt, first = list(params["prompt_token_ids"]), int(params["first_token"])
        stop = engine.stop_params(seq.request.params)
        if not engine.scheduler.add_computed_request(seq_id, prompt + [first], len(prompt),
                                                     int(params["num_computed_tokens"]), stop, entry.priority):
            return set()  # every seat is taken: next step
        del self._incoming[seq_id]
        seq.sampling.output_token_ids.append(first)
        logprobs = params.get("first_logprobs")
        logprobs = None if logprobs is None else {int(k): v for k, v in logprobs.items()}
        seq.request.metrics.first_scheduled_time = time.monotonic()
        seq.request.metrics.num_cached_tokens = len(prompt)
        engine.append_first_token(seq, first, logprobs)
        return {seq.request.request_id}

    def _fail(self, entry: _Incoming, message: str) -> set[str]:
        self.engine.fail_sequence(entry.seq, f"KV transfer failed: {message}")
        return {entry.seq.request.request_id}

    def close(self) -> None:
        self.connector.close()
