"""The ``tidal`` command: --version, ``generate`` streaming a completion, and its errors."""

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
    ]
    for args, match in cases:
        r = _run(*args)
        assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = _run("serve", "--role", "middle")
    assert r.returncode == 2 and "invalid choice" in r.stderr
