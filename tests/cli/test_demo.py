"""``tidal demo`` end to end with a reduced step count: the loss falls, text comes out, and a second
run reuses the cached model."""

import os
import re
import subprocess
import sys
import time

_LOSS = re.compile(r"loss: first ([0-9.]+) last ([0-9.]+)")
_GENERATED = re.compile(r"generated (\d+) tokens for (\d+) prompts in [0-9.]+ s \(([0-9.,]+) tokens/s\)")


def _demo(cache_dir, *extra):
    env = {**os.environ, "TIDAL_CACHE": str(cache_dir / "unused")}  # --cache-dir must win
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tidal", "demo", "--cache-dir", str(cache_dir), "--size", "small",
                        "--max-tokens", "24", "--prompts", "def ", "    self.", *extra],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, time.perf_counter() - t0


def test_demo_trains_saves_generates_and_reuses(tmp_path):
    cache = tmp_path / "cache"
    first, first_s = _demo(cache, "--steps", "30")
    loss = _LOSS.search(first.stdout)
    assert loss, first.stdout
    start, end = float(loss.group(1)), float(loss.group(2))
    assert start > 5.0 and end < start - 1.5, (start, end)  # from ~ln(258) to well below it
    generated = _GENERATED.search(first.stdout)
    assert generated and int(generated.group(1)) > 0 and generated.group(2) == "2", first.stdout
    assert "Traceback" not in first.stderr
    assert not first.stderr.count("\r")  # no progress bar when stderr is not a terminal
    assert "step    30/30" in first.stderr  # the compact progress lines instead

    model = cache / "small"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model / name).is_file(), name
    assert not (tmp_path / "cache" / "unused").exists()

    second, second_s = _demo(cache, "--steps", "30")
    assert "using the cached demo model" in second.stdout
    assert "trained 30 steps in" not in second.stdout and "step " not in second.stderr
    assert _GENERATED.search(second.stdout)
    assert second_s < first_s


def test_demo_tokenizer_is_byte_level(tmp_path):
    """Every byte round-trips and ids 0..255 are the bytes themselves."""
    from tidal.demo import SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer()
    text = "def f(self):\n\treturn 'héllo' + \"\\x00\"  # ü\n"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 256 + len(SPECIAL_TOKENS)
    assert tok.token_to_id("<|endoftext|>") == 256
