"""The ``tidal`` command: --version, ``generate`` streaming a completion, ``eval-ppl`` printing a
perplexity (in process, through ``main``), and their errors."""

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import build_model  # noqa: E402

import tidal  # noqa: E402


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tidal", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    build_model(str(path))
    return str(path)


def test_python_m_tidal_version():
    r = _run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"tidal {tidal.__version__}"


def test_console_script_version():
    exe = shutil.which("tidal")
    if exe is None:
        try:
            dist = importlib.metadata.distribution("tidal")
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is None or not any(e.name == "tidal" for e in dist.entry_points):
            pytest.skip("the `tidal` console script exists only after `pip install`")
        pytest.fail("tidal declares the console script but it is not on PATH")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"tidal {tidal.__version__}"


def test_generate_streams_text(tiny_model):
    r = _run("generate", tiny_model, "--prompt", "def add(", "--max-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def add(")
    assert len(r.stdout.strip()) > len("def add(")
    assert "Traceback" not in r.stderr


def test_generate_sampling_options(tiny_model):
    args = ("generate", tiny_model, "--prompt", "class ", "--max-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--dtype", "float32", "--device", "cpu")
    first, second = _run(*args), _run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # seeded: the same sample twice


def test_generate_bad_model_path(tmp_path):
    r = _run("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidal: error:") and "missing" in lines[0], r.stderr
    r = _run("generate", str(tmp_path), "--prompt", "x")  # a directory, but no model in it
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "config.json" in r.stderr


def test_generate_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = _run("generate", str(tmp_path), "--prompt", "x")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_argument_errors_exit_2():
    r = _run("generate")
    assert r.returncode == 2 and "usage:" in r.stderr
    r = _run("demo", "--size", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _run("serve", "--port", "not-a-port")
    assert r.returncode == 2 and "invalid int value" in r.stderr
    r = _run()
    assert r.returncode == 2


def test_serve_role_errors(tiny_model):
    cases = [
        (("serve", "--role", "router", "--decode", "http://127.0.0.1:1"), "at least one --prefill URL"),
        (("serve", tiny_model, "--role", "router", "--prefill", "http://a:1", "--decode", "http://b:1"),
         "serves no model"),
        (("serve", "--role", "router", "--prefill", "a:1", "--decode", "http://b:1"), "must start with http://"),
        (("serve", tiny_model, "--prefill", "http://a:1"), "the router's"),
        (("serve", tiny_model, "--role", "disaggregated", "--num-decode", "0"), "--num-decode=0 must be >= 1"),
        (("serve", tiny_model, "--role", "disaggregated", "--prefill-share", "1.5"),
         "--prefill-share=1.5 must be in (0, 1)"),
        (("serve", tiny_model, "--prefill-sms", "16"), "--prefill-sms is --role disaggregated's"),
        (("serve", tiny_model, "--role", "disaggregated", "--prefill-sms", "16", "--device", "cpu"),
         "prefill_sms=16 splits a GPU's SMs; device='cpu' is cpu"),
    ]
    for args, match in cases:
        r = _run(*args)
        assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = _run("serve", "--role", "middle")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_eval_ppl_prints_the_perplexity(tiny_model, tmp_path, capsys):
    from tidal.cli import main
    from tidal.serve.eval import perplexity

    text_file = tmp_path / "text.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. " * 6 + "def add(a, b):\n    return a + b\n")
    assert main(["eval-ppl", tiny_model, "--file", str(text_file), "--context", "32", "--device", "cpu"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    want = perplexity(tidal.LLM(tiny_model, device="cpu", num_kv_blocks=64), text_file.read_text(), context=32)
    assert float(printed["perplexity"]) == pytest.approx(want.perplexity, rel=1e-4)
    assert int(printed["tokens"]) == want.num_tokens and int(printed["windows"]) == want.num_windows > 1

    for args, match in [(["--file", str(tmp_path / "missing.txt")], "cannot read --file"),
                        (["--file", str(text_file), "--context", "1"], "--context=1 must be an integer >= 2"),
                        (["--file", str(text_file), "--context", "8", "--stride", "9"], "--stride=9 must be")]:
        assert main(["eval-ppl", tiny_model, *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tidal: error:") and match in err and len(err.strip().splitlines()) == 1, err


def test_eval_ppl_passes_quantization_through(tiny_model, tmp_path, capsys, monkeypatch):
    from tidal.cli import main

    seen = []

    def fake_llm(model, **kwargs):
        seen.append(kwargs)
        raise RuntimeError("not loaded")

    monkeypatch.setattr(tidal, "LLM", fake_llm)
    text_file = tmp_path / "text.txt"
    text_file.write_text("def add(a, b):\n    return a + b\n")
    assert main(["eval-ppl", tiny_model, "--file", str(text_file), "--quantization", "int8"]) == 1
    assert main(["eval-ppl", tiny_model, "--file", str(text_file)]) == 1
    assert seen[0]["quantization"] == "int8" and seen[1].get("quantization") is None
    assert "cannot load" in capsys.readouterr().err
