"""The elastic example under torchrun's own elastic agents (c10d rendezvous, Gloo on the CPU): three
agents train; at a random step one agent is killed with its worker (the node is gone); the survivors'
collective fails, their agents restart them at world size 2 from the latest checkpoint; a fourth
agent then joins and the job grows back to 3. Every step is trained once (at the world sizes that
sequence implies), no sample is lost or seen twice, and the final weights equal an uninterrupted
single-process run over the same samples within fp32 tolerance."""

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_util import assert_state_close, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "elastic", "train.py")
STEPS = 18  # 18 x 12 samples: one pass over the example's 240, so any repeat is a sample seen twice


def _latest(checkpoints: str) -> dict | None:
    """index.json of the latest complete checkpoint, None before the first one (or mid-rename)."""
    try:
        with open(os.path.join(checkpoints, "latest")) as f:
            tag = f.read().strip()
        with open(os.path.join(checkpoints, tag, "index.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and every process below it (torchrun's workers run in sessions of their own,
    so the agent's process group does not reach them)."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[ppid].append(int(entry))
    stack, tree = [pid], []
    while stack:
        p = stack.pop()
        tree.append(p)
        stack += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(predicate, what: str, timeout: float, agents) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        if any(a.poll() not in (None, 0) for a in agents):
            raise AssertionError(f"an agent failed while waiting for {what}")
        time.sleep(0.2)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's elastic agents and process groups: Linux")
def test_torchrun_agents_lose_a_node_and_gain_one(tmp_path):
    out = str(tmp_path / "run")
    checkpoints = os.path.join(out, "checkpoints")
    port = free_port()
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", TIDAL_COLLECTIVE_TIMEOUT_S="20",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = []

    def agent(i: int) -> subprocess.Popen:
        log = open(tmp_path / f"agent{i}.log", "w")
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2:3", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
               "--rdzv-conf", "last_call_timeout=2,join_timeout=120", "--max-restarts", "5",
               "--monitor-interval", "0.5", EXAMPLE, "--out", out, "--steps", str(STEPS), "--step-seconds", "0.7"]
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    agents = []
    try:
        agents.append(agent(0))  # the first agent hosts the rendezvous store: it stays up
        time.sleep(1.0)
        agents += [agent(1), agent(2)]
        kill_after = random.Random(os.getpid()).randint(3, 5)
        _wait_for(lambda: (_latest(checkpoints) or {}).get("counters", {}).get("global_steps", 0) >= kill_after,
                  f"step {kill_after}", 120, agents)
        _kill_tree(agents[2].pid)  # the node is gone, mid-step
        agents[2].wait()
        _wait_for(lambda: (_latest(checkpoints) or {}).get("world_size") == 2, "a checkpoint at world size 2", 120,
                  agents[:2])
        agents.append(agent(3))  # a node joins
        for a in (agents[0], agents[1], agents[3]):
            a.wait(timeout=240)
    finally:
        for a in agents:
            if a.poll() is None:
                _kill_tree(a.pid)
        for log in logs:
            log.close()
    tails = {i: open(tmp_path / f"agent{i}.log").read()[-3000:] for i in (0, 1, 3)}
    assert [agents[i].returncode for i in (0, 1, 3)] == [0, 0, 0], tails

    with open(os.path.join(out, "trained.json")) as f:
        trained = json.load(f)
    assert [r["step"] for r in trained] == list(range(1, STEPS + 1))
    worlds = [r["world_size"] for r in trained]
    # 3 ranks up to the kill (at least kill_after steps), then 2, then 3 again to the end
    first_two, last_two = worlds.index(2), len(worlds) - 1 - worlds[::-1].index(2)
    assert first_two >= kill_after and last_two < STEPS - 1, worlds
    assert worlds == [3] * first_two + [2] * (last_two - first_two + 1) + [3] * (STEPS - 1 - last_two), worlds
    counts = collections.Counter(x for r in trained for x in r["samples"])
    assert sum(counts.values()) == STEPS * 12 and set(counts.values()) == {1}  # none skipped, none twice

    sys.path.insert(0, os.path.dirname(EXAMPLE))
    try:
        import train as example
    finally:
        sys.path.remove(os.path.dirname(EXAMPLE))
    want = example.train(str(tmp_path / "uninterrupted"), STEPS)  # one process, the same global batches
    assert_state_close(torch.load(os.path.join(out, "final.pt")), want, rtol=1e-4, atol=1e-5)
