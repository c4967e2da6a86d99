#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Smoke test of an installed tidal wheel: what a user does first, on whatever torch is installed.

1. ``import tidal`` and ``tidal.build_info()``; the native libraries link no torch, no libpython
   and no shared CUDA runtime, and every library they need is either in the wheel or one the
   manylinux policy lets a wheel assume (checked with ``ldd``: nothing "not found").
2. The CPU kernels through the torch ops tidal registers (RMSNorm, SiLU-and-mul) against their
   pure-torch definitions.
3. A training run: a small Llama built by tidal, three ``tidal.initialize`` steps (AdamW, ZeRO
   stage 1 over one rank), the loss finite, the weights moved, the model saved in Hugging Face format.
4. Generation: ``tidal.LLM`` loads that directory and generates greedily on the CPU; two prompts
   batched give the tokens each gives alone, and the KV pool is whole afterwards.

``--no-compiler`` also fails the run when a C/C++/CUDA compiler or CMake is on PATH (the wheel must
not need one). Exit status 0 when everything passed.

    python packaging/smoke_test.py [--no-compiler]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc", "hipcc", "cmake")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"SMOKE TEST FAILED: {what}")
    print(f"ok: {what}", flush=True)


def native_libraries(tidal) -> list[str]:
    package = os.path.dirname(tidal._core.__file__)
    return [tidal._core.__file__] + sorted(glob.glob(os.path.join(package, "lib", "*.so*")))


def check_linkage(tidal) -> None:
    if sys.platform != "linux":
        return
    # what ldd runs, without needing ldd (or anything else) on PATH
    name = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}.get(platform.machine(), "")
    loaders = [d + name for d in ("/lib64/", "/lib/", "/usr/lib64/") if name and os.path.exists(d + name)]
    check(bool(loaders), "the dynamic loader is found")
    for lib in native_libraries(tidal):
        name = os.path.basename(lib)
        ldd = subprocess.run([loaders[0], "--list", lib], capture_output=True, text=True, check=True).stdout
        missing = [line.strip() for line in ldd.splitlines() if "not found" in line]
        check(not missing, f"{name}: every needed library resolves {missing or ''}".rstrip())
        bad = [w for w in ("libtorch", "libc10", "libcudart.so", "libpython") if w in ldd]
        check(not bad, f"{name}: links no torch, no libpython, no shared CUDA runtime {bad or ''}".rstrip())


def check_ops(torch) -> None:
    from tidal import ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    check(torch.allclose(ops.rms_norm(x, w, 1e-6), want, atol=1e-5, rtol=1e-5), "rms_norm equals its torch definition")
    gate_up = torch.randn(5, 128, generator=gen)
    want = torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:]
    check(torch.allclose(ops.silu_and_mul(gate_up), want, atol=1e-5, rtol=1e-5),
          "silu_and_mul equals its torch definition")


def train_and_save(torch, tidal, path: str) -> None:
    from tidal.demo import EOS_ID, build_tokenizer, hf_config, save_tokenizer
    from tidal.models.config import ModelConfig
    from tidal.models.llama import LlamaForCausalLM
    from tidal.models.loader import save_model

    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    spec = {**hf_config("small", vocab), "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    config = ModelConfig.from_dict(spec, source="smoke test config")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, dtype=torch.float32, device="cpu")
    model.initialize_weights(generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = tidal.initialize(model, {
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "zero_optimization": {"stage": 1},
    })
    data = torch.randint(0, EOS_ID, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        logits = engine(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), data[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    check(all(math.isfinite(v) for v in losses), f"three training steps, losses {[round(v, 4) for v in losses]}")
    state = engine.full_state_dict()
    moved = sum(not torch.equal(state[k].float(), before[k].float()) for k in before if k in state)
    check(moved == len(before), f"every parameter moved ({moved} of {len(before)})")
    final = LlamaForCausalLM(config, dtype=torch.float32, device="cpu")
    final.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=False)
    save_model(final, Path(path))
    save_tokenizer(tok, Path(path))
    check(os.path.exists(os.path.join(path, "config.json")), "saved in Hugging Face format")


def generate(tidal, path: str) -> None:
    llm = tidal.LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, block_size=16, max_model_len=128)
    greedy = tidal.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = ["def add(a, b):", "import os\n"]
    together = llm.generate(prompts, greedy, use_tqdm=False)
    alone = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
    check(all(len(o.outputs[0].token_ids) == 8 for o in together), "tidal.LLM generated 8 tokens per prompt")
    check([o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone],
          "batched greedy tokens equal each prompt's alone")
    stats = llm.stats()
    free, total = stats["kv_blocks_free"], stats["kv_blocks_total"]
    check(free == total, f"the KV pool is whole afterwards ({free} of {total} blocks free)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-compiler", action="store_true", help="fail when a compiler or CMake is on PATH")
    args = ap.parse_args()
    t0 = time.time()
    if args.no_compiler:
        found = {c: shutil.which(c) for c in COMPILERS if shutil.which(c)}
        check(not found, f"no compiler or CMake on PATH {found or ''}".rstrip())

    import torch

    import tidal

    info = tidal.build_info()
    print(f"tidal {info['version']} from {os.path.dirname(tidal.__file__)}; torch {torch.__version__}; "
          f"python {sys.version.split()[0]}", flush=True)
    print(f"build_info: {info}", flush=True)
    check_linkage(tidal)
    check_ops(torch)
    with tempfile.TemporaryDirectory(prefix="tidal-smoke-") as tmp:
        train_and_save(torch, tidal, tmp)
        generate(tidal, tmp)
    print(f"SMOKE TEST PASSED with torch {torch.__version__} in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
