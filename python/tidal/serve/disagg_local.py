"""Disaggregated serving in one process (``tidal serve MODEL --role disaggregated``): a prefill engine,
``num_decode`` decode engines and the router, over one copy of the weights on one device.

Engines of one process hand a prompt's KV blocks over by copying them between their pools on the
device (the torch connector's in-process path), where engines in separate processes on one GPU send
them through host memory: the transfer that dominated the time to first token of two processes
(bench/RESULTS.md, D1) becomes a gather and a scatter on the card. On a GPU each engine steps on a
CUDA stream of its own, the decode engines' at a higher priority than the prefill engine's, so a
decode step's kernels are scheduled ahead of a long prefill's as soon as the card has room, instead
of the two processes' work taking turns on it. A priority only orders blocks waiting to be scheduled,
though: a long prefill's kernels already on the SMs still stretch the decode steps beside them. With
``prefill_sms`` the card's SMs are split (CUDA green contexts, tidal._core.device.SmPartition): the
prefill engine's kernels run on a group of at least that many SMs and the decode engines' on the
rest, their CUDA graphs captured on their own streams so the replays keep to that group too.

The KV memory the process may use (``kv_cache_memory_fraction`` of the card, less the weights)
is split between the prefill engine (``prefill_share`` of it) and the decode engines (the rest,
equally); with ``num_kv_blocks`` set, every engine gets that many. The prefill engine runs eagerly:
it never decodes, so it captures no CUDA graph. The engines serve the OpenAI API on loopback ports
behind the router, which alone listens where the user asked; they accept only the router (a key
made at start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import sys
import threading
import time
from typing import NamedTuple

import torch

from tidal.serve.config import EngineConfig, resolve_device


class LocalEngines(NamedTuple):
    """What :func:`build_engines` makes: the engines and the CUDA stream each steps on (None on the
    CPU), and the SM groups behind those streams (None without ``prefill_sms``)."""
    prefill: "LLMEngine"  # noqa: F821
    decodes: list
    streams: list
    sm_groups: "SmGroups | None"


class SmGroups:
    """A device's SMs split between the engines of one process: the prefill engine's stream runs on
    group 0 (at least ``prefill_sms`` SMs, rounded up by the driver), the decode engines' on group 1
    (the rest) at a higher priority.

    A partition and its streams live as long as the process: CUDA graphs captured on a stream keep
    its green context, and nothing orders their release after a server's engines are gone. One is
    made per (device, prefill_sms) and reused by every server of the process that asks for it."""

    _made: dict[tuple[int, int], "SmGroups"] = {}

    def __init__(self, device: torch.device, prefill_sms: int):
        from tidal import _core

        self.device = device
        self.partition = _core.device.SmPartition(device.index, prefill_sms)
        self.prefill_stream = self._stream(0, priority=0)
        self._decode_streams: list[torch.cuda.ExternalStream] = []

    @classmethod
    def get(cls, device: torch.device, prefill_sms: int) -> "SmGroups":
        key = (device.index, prefill_sms)
        if key not in cls._made:
            cls._made[key] = cls(device, prefill_sms)
        return cls._made[key]

    @property
    def sm_counts(self) -> tuple[int, int]:
        """The SMs of the prefill group and of the decode group."""
        return self.partition.sm_count(0), self.partition.sm_count(1)

    def decode_streams(self, count: int) -> list:
        while len(self._decode_streams) < count:  # a lower number is a higher priority
            self._decode_streams.append(self._stream(1, priority=-1))
        return self._decode_streams[:count]

    def _stream(self, group: int, priority: int):
        handle = self.partition.create_stream(group, priority)
        return torch.cuda.ExternalStream(handle, device=self.device)


def build_engines(config: EngineConfig, num_decode: int = 1, prefill_share: float = 0.3,
                  prefill_sms: int | None = None) -> LocalEngines:
    """The engines of one process, sharing one model loaded from ``config.model`` (a checkpoint
    directory), each with ``kv_role`` set and its part of the KV memory (see the module docstring).
    On a GPU each engine is built on the stream it will step on (its CUDA graphs are captured
    there); ``prefill_sms`` splits the SMs between the roles."""
    from tidal.models import load_model
    from tidal.serve.engine import LLMEngine

    if not isinstance(num_decode, int) or num_decode < 1:
        raise ValueError(f"num_decode={num_decode!r} must be an integer >= 1")
    if not 0.0 < prefill_share < 1.0:
        raise ValueError(f"prefill_share={prefill_share!r} must be in (0, 1)")
    if prefill_sms is not None and (isinstance(prefill_sms, bool) or not isinstance(prefill_sms, int)
                                    or prefill_sms < 1):
        raise ValueError(f"prefill_sms={prefill_sms!r} must be a positive integer (SMs for the prefill engine)")
    if not isinstance(config.model, str):
        raise ValueError("disaggregated serving in one process loads its model from a checkpoint directory; "
                         f"got model={type(config.model).__name__}")
    if config.kv_role is not None:
        raise ValueError(f"kv_role={config.kv_role!r}: the engines of one process take their roles themselves")
    if config.tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}: disaggregated serving in one "
                         f"process runs on one device")
    device = resolve_device(config.device)
    if prefill_sms is not None and device.type != "cuda":
        raise ValueError(f"prefill_sms={prefill_sms} splits a GPU's SMs; device={config.device!r} is {device}")
    fraction = config.kv_cache_memory_fraction
    model, _ = load_model(config.model, dtype=config.dtype, device=device, quantization=config.quantization)
    if device.type == "cuda":  # the weights come out of the process's share once, before it is split
        fraction -= torch.cuda.memory_allocated(device) / torch.cuda.get_device_properties(device).total_memory
        if fraction <= 0:
            raise ValueError(f"kv_cache_memory_fraction={config.kv_cache_memory_fraction} of the card leaves no "
                             f"room for KV blocks after the weights")
    shared = dict(model=model, tokenizer=config.tokenizer or _tokenizer_dir(config.model), quantization=None,
                  device=str(device), kv_host="127.0.0.1", kv_port=0)
    prefill = dataclasses.replace(config, kv_role="prefill", enforce_eager=True,
                                  kv_cache_memory_fraction=fraction * prefill_share, **shared)
    decode = dataclasses.replace(config, kv_role="decode",
                                 kv_cache_memory_fraction=fraction * (1 - prefill_share) / num_decode, **shared)
    groups, streams = None, [None] * (1 + num_decode)
    if device.type == "cuda":
        if prefill_sms is not None:
            groups = SmGroups.get(device, prefill_sms)
            streams = [groups.prefill_stream, *groups.decode_streams(num_decode)]
        else:  # a lower number is a higher priority
            streams = [torch.cuda.Stream(device, priority=0)]
            streams += [torch.cuda.Stream(device, priority=-1) for _ in range(num_decode)]
        # the streams do not wait for the default one: the weights are on the card before they start
        torch.cuda.synchronize(device)
    engines = []
    try:
        for engine_config, stream in zip([prefill] + [decode] * num_decode, streams):
            with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                engines.append(LLMEngine(engine_config))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # start-up's work on each stream is done before another uses it
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return LocalEngines(engines[0], engines[1:], streams, groups)


def _tokenizer_dir(path: str) -> str | None:
    """``path`` when its checkpoint has a tokenizer (an engine of a model object takes it from there),
    else None: prompts are then token ids, as for an engine loading ``path`` itself."""
    from tidal.tokenizer import Tokenizer

    try:
        Tokenizer(path)
    except ValueError:
        return None
    return path


class DisaggregatedServer:
    """The router on ``host:port`` in front of one process's prefill and decode engines, each engine
    served on a loopback port from a thread of its own.

    :meth:`start` serves the engines (and, with ``router_thread=True``, the router too) and returns
    once they listen; :meth:`serve_forever` runs the router in the calling thread until SIGINT or
    SIGTERM, then stops everything; :meth:`stop` stops whatever runs."""

    def __init__(self, config: EngineConfig, num_decode: int = 1, prefill_share: float = 0.3,
                 host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 served_model_name: str | None = None, media=None, limits=None, log_level: str = "info",
                 prefill_sms: int | None = None):
        built = build_engines(config, num_decode, prefill_share, prefill_sms)
        self.engines = [built.prefill, *built.decodes]
        self.streams = built.streams
        self.sm_groups = built.sm_groups
        try:
            self._serve(config, host, port, api_key, served_model_name, media, limits, log_level)
        except BaseException:
            for engine in self.engines:
                engine.close()
            raise
        self._threads: list[threading.Thread] = []

    def _serve(self, config, host, port, api_key, served_model_name, media, limits, log_level) -> None:
        """The engines' servers and the router's, not yet running."""
        from tidal.serve.api_server import engine_server
        from tidal.serve.async_engine import AsyncLLMEngine
        from tidal.serve.kv_transfer import free_port
        from tidal.serve.router import router_server

        name = served_model_name or os.path.basename(os.path.normpath(config.model))
        key = secrets.token_urlsafe(24)
        self._engine_servers = []
        urls = []
        for engine, stream in zip(self.engines, self.streams):
            engine_port = free_port("127.0.0.1")
            self._engine_servers.append(engine_server(AsyncLLMEngine(engine, stream), name, "127.0.0.1", engine_port,
                                                      api_key=key, media=media, limits=limits, log_level=log_level))
            urls.append(f"http://127.0.0.1:{engine_port}")
        self.router = router_server(urls[:1], urls[1:], host, port, log_level=log_level, api_key=api_key,
                                    engine_api_key=key, served_model_name=name)
        self.url = f"http://{host}:{port}"

    def start(self, router_thread: bool = False, timeout: float = 60.0) -> "DisaggregatedServer":
        # the engines listen before the router's first health check
        self._run_in_threads(self._engine_servers, timeout)
        if router_thread:
            self._run_in_threads([self.router], timeout)
        return self

    def _run_in_threads(self, servers, timeout: float) -> None:
        for server in servers:
            thread = threading.Thread(target=server.run, name="tidal-disagg-server", daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + timeout
        while not all(s.started for s in servers):
            if time.monotonic() > deadline or not all(t.is_alive() for t in self._threads):
                self.stop()
                raise RuntimeError("the disaggregated server's engines or router did not start")
            time.sleep(0.01)

    def serve_forever(self) -> None:
        # NOTE(tidal): the engines' threads share one interpreter lock; a decode step waiting for it
        # while the prefill engine launches kernels waits up to the switch interval (5 ms by default).
        # This process serves nothing else, so it hands the lock over every 0.5 ms: on the CPU
        # (bench/disagg.py --tiny --systems colocated,one-process, two runs each) the short requests'
        # p99 time per output token was 3.1 / 2.8 ms at 0.5 ms against 7.9 / 3.8 / 5.2 ms at 5 ms.
        sys.setswitchinterval(0.0005)
        self.start()
        try:
            self.router.run()
        finally:
            self.stop()

    def stop(self) -> None:
        self.router.should_exit = True
        for server in self._engine_servers:
            server.stop()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()

    def __enter__(self) -> "DisaggregatedServer":
        return self.start(router_thread=True)

    def __exit__(self, *exc) -> None:
        self.stop()
