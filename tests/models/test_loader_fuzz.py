"""Every loader of a user-supplied file under hypothesis-generated corruption: config.json, the
safetensors files (length prefix, JSON header, body), model.safetensors.index.json, the tokenizer
files, preprocessor_config.json and a training checkpoint's latest / index.json / shard.

Each example either loads (a harmless change) or raises exactly ValueError or FileNotFoundError
whose message names the corrupted file; any other exception, a hang (SIGALRM; faulthandler ends the
process should native code never return) or a crash fails. Examples are derandomized and no example
database is kept, so CI runs the same cases every time (``TIDAL_FUZZ_EXAMPLES`` sets how many). The
regression tests at the end pin, as minimal inputs, each failure hypothesis found against the
loaders as they were."""

import contextlib
import copy
import faulthandler
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tidal
from tidal.models import load_model
from tidal.models.loader import safetensors_files
from tidal.multimodal.processing import ImageProcessor
from tidal.tokenizer import Tokenizer
from tiny_models import build_model

EXAMPLES = int(os.environ.get("TIDAL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
TIME_LIMIT_S = 20

# ---- the guard every example runs under ----------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int = TIME_LIMIT_S):
    """TimeoutError after ``seconds`` of Python code; a process dump and exit if native code hangs."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"a loader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def loads_or_names(load, name: str):
    """``load()``'s result, or None where it raised exactly ValueError / FileNotFoundError naming ``name``."""
    with time_limit():
        try:
            return load()
        except (ValueError, FileNotFoundError) as e:
            assert type(e) in (ValueError, FileNotFoundError), f"{type(e).__name__} leaked: {e}"
            assert name in str(e), f"the error does not name {name}: {e}"
            return None


@contextlib.contextmanager
def replaced(path: Path, data: bytes | None):
    """``path`` holds ``data`` (None: is removed) inside the block, its own bytes again after."""
    original = path.read_bytes() if path.exists() else None
    if data is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(data)
    try:
        yield path
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


# ---- corruptions ------------------------------------------------------------------------------------------

DEEP, HUGE = "__deep_nesting__", "__huge_literal__"  # swapped for raw text json.dumps cannot write
SPECIAL_INTS = [0, -1, -2 ** 31, 2 ** 31, 2 ** 53 + 1, 2 ** 60, 2 ** 63, 2 ** 64, 10 ** 30]
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 400), st.sampled_from(SPECIAL_INTS),
    st.sampled_from([0.5, -1.5, 1e308, float("inf"), float("-inf"), float("nan")]),
    st.text(max_size=6),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "", "a\x00b", "F64", "F16", "I32", "BOOL",
                     "F8_E4M3", "C64", "Q4", "silu", "model.safetensors"]),
    st.lists(st.one_of(st.integers(-2, 70), st.sampled_from(SPECIAL_INTS)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2),
    st.sampled_from([DEEP, HUGE]),
)


def _retyped(value):
    """The same information in another JSON type: "a string where an int belongs" and so on."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return list(value.values())


def _mutate_once(draw, doc):
    if not isinstance(doc, (dict, list)) or not doc or draw(st.integers(0, 15)) == 0:
        return draw(GARBAGE)  # the whole document replaced
    parent = doc
    while True:  # a random walk down to the container to change
        key = draw(st.sampled_from(list(parent) if isinstance(parent, dict) else range(len(parent))))
        child = parent[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            parent = child
            continue
        break
    op = draw(st.sampled_from(["delete", "replace", "retype", "insert", "rename"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = draw(GARBAGE)
    elif op == "retype":
        parent[key] = _retyped(parent[key])
    elif op == "insert" and isinstance(parent, dict):
        parent[draw(st.text(max_size=4))] = draw(GARBAGE)
    elif op == "insert":
        parent.insert(draw(st.integers(0, len(parent))), draw(GARBAGE))
    elif isinstance(parent, dict):  # rename
        parent[draw(st.text(max_size=4))] = parent.pop(key)
    return doc


def _dumps(doc) -> bytes:
    text = json.dumps(doc)
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)  # past the parser's recursion limit
    return text.replace(json.dumps(HUGE), "9" * 5000).encode()  # past int()'s 4300-digit limit


@st.composite
def mutated_json(draw, doc):
    """``doc`` with 1-3 keys deleted, replaced, retyped, inserted or renamed, as file bytes."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        doc = _mutate_once(draw, doc)
    return _dumps(doc)


@st.composite
def mutated_bytes(draw, data: bytes, hot: int | None = None):
    """``data`` truncated, with bytes overwritten or inserted (positions below ``hot`` preferred), or
    replaced whole by a pathological text."""
    op = draw(st.sampled_from(["truncate", "overwrite", "insert", "whole"]))
    hot = len(data) if hot is None else min(hot, len(data))
    position = draw(st.one_of(st.integers(0, hot), st.integers(0, len(data))))
    if op == "truncate":
        return data[:position]
    if op == "whole":
        return draw(st.sampled_from([b"", b"null", b"[]", b"42", b'"x"', b"\xff\xfe\x00", b"{" * 100_000,
                                     b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}"]))
    chunk = draw(st.binary(min_size=1, max_size=4))
    if op == "insert":
        return data[:position] + chunk + data[position:]
    return data[:position] + chunk + data[position + len(chunk):]


def json_corruption(path: Path):
    raw = path.read_bytes()
    return st.one_of(mutated_json(json.loads(raw)), mutated_bytes(raw))


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack_safetensors(header, body: bytes, length: int | None = None) -> bytes:
    blob = _dumps(header)
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) if length is None else length) + blob + body


@st.composite
def corrupt_safetensors(draw, data: bytes):
    """``data`` (a safetensors file) with its length prefix, header bytes, header JSON or body changed."""
    header, body = _safetensors_parts(data)
    end_of_header = len(data) - len(body)
    op = draw(st.sampled_from(["length", "header_bytes", "header_json", "header_json", "bytes", "body"]))
    if op == "length":  # the 8-byte little-endian header length
        length = draw(st.one_of(st.sampled_from([0, 1, 2, end_of_header - 9, end_of_header - 7, len(data) - 8,
                                                 len(data), 100_000_001, 2 ** 31, 2 ** 60, 2 ** 64 - 1]),
                                st.integers(0, len(data))))
        return struct.pack("<Q", length) + data[8:]
    if op == "header_json":  # dtypes, shapes, data_offsets, __metadata__ rewritten, length kept right or not
        keep_length = draw(st.integers(0, 4)) == 0
        return _pack_safetensors(_mutated_header(draw, header), body, end_of_header - 8 if keep_length else None)
    if op == "body":  # any value is a valid float: loads
        position = draw(st.integers(end_of_header, len(data) - 1))
        return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    if op == "bytes":  # truncated, overwritten or inserted anywhere, the header region preferred
        return draw(mutated_bytes(data, hot=end_of_header + 16))
    return draw(mutated_bytes(data[:end_of_header]).map(lambda b: b + data[end_of_header:]))  # header_bytes


def _mutated_header(draw, header):
    """1-3 tensor entries with a dtype, shape or data_offsets replaced, or any key changed."""
    header = copy.deepcopy(header)
    for _ in range(draw(st.integers(1, 3))):
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            break
        target = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "any"]))
        name = draw(st.sampled_from(names))
        entry = header[name]
        if not isinstance(entry, dict):  # replaced whole by an earlier round
            continue
        if target == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(["F64", "F16", "BF16", "I32", "U32", "I64", "BOOL", "U8",
                                                             "F8_E4M3", "C64", "XX", ""]), GARBAGE))
        elif target == "shape":
            reversed_shape = entry["shape"][::-1] if isinstance(entry.get("shape"), list) else []
            entry["shape"] = draw(st.one_of(st.just([2 ** 60]), st.just([0, 2 ** 70]), st.just(reversed_shape),
                                            st.lists(st.integers(-2, 400), max_size=3), GARBAGE))
        elif target == "data_offsets":
            lo, hi = entry["data_offsets"] if isinstance(entry.get("data_offsets"), list) and \
                len(entry["data_offsets"]) == 2 else (0, 0)
            entry["data_offsets"] = draw(st.one_of(
                st.just([lo, hi + 4]), st.just([lo - 4, hi]), st.just([hi, lo]), st.just([lo, 2 ** 64]),
                st.just([-8, hi]), st.just([lo, hi, hi]), st.lists(st.integers(-2, 2 ** 20), max_size=3), GARBAGE))
        elif target == "entry":
            header[name] = draw(GARBAGE)
        else:
            header = _mutate_once(draw, header)
            if not isinstance(header, dict):
                return header
    return header


# ---- files under test -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    build_model(str(path), num_layers=1)
    return path


@pytest.fixture(scope="module")
def sharded_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model as three shards and model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("sharded")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, path / name)
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[i::3]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                   "weight_map": weight_map}))
    return path


PREPROCESSORS = {
    "clip": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
             "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
             "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27], "resample": 3,
             "rescale_factor": 0.00392156862745098},
    "qwen2vl": {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 40000,
                "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]},
}

TRAIN_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "zero_optimization": {"stage": 1},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(engine, checkpoint directory) after one step of a tiny model, saved under the tag ``s``."""
    torch.manual_seed(0)
    engine = tidal.initialize(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)),
                              TRAIN_CONFIG)
    engine.backward(engine(torch.randn(2, 5)).square().mean())
    engine.step()
    directory = tmp_path_factory.mktemp("ckpt")
    engine.save_checkpoint(str(directory), "s")
    return engine, directory


# ---- fuzz tests -------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_config_json(model_dir, data):
    config = model_dir / "config.json"
    with replaced(config, data.draw(json_corruption(config))):
        loads_or_names(lambda: load_model(model_dir), "config.json")
        loads_or_names(lambda: Tokenizer(str(model_dir)), "config.json")


@FUZZ
@given(data=st.data())
def test_safetensors_file(model_dir, data):
    file = model_dir / "model.safetensors"
    with replaced(file, data.draw(corrupt_safetensors(file.read_bytes()))):
        loads_or_names(lambda: load_model(model_dir), "model.safetensors")


@FUZZ
@given(data=st.data())
def test_safetensors_index(sharded_dir, data):
    index = sharded_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    bad_names = st.sampled_from(["../../etc/passwd", "/etc/passwd", "../model.safetensors", "missing.safetensors",
                                 "", ".", "..", "a\x00b", "config.json", "model-00001-of-00003.safetensors"])

    def retarget(name):
        changed = copy.deepcopy(doc)
        changed["weight_map"][data.draw(st.sampled_from(sorted(doc["weight_map"])))] = name
        return _dumps(changed)

    corrupted = data.draw(st.one_of(json_corruption(index), bad_names.map(retarget)))
    with replaced(index, corrupted):
        loads_or_names(lambda: load_model(sharded_dir), "model.safetensors.index.json")


@FUZZ
@given(data=st.data())
def test_tokenizer_files(model_dir, data):
    name = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "generation_config.json"]))
    path = model_dir / name
    with replaced(path, data.draw(json_corruption(path))):
        tokenizer = loads_or_names(lambda: Tokenizer(str(model_dir)), name)
        if tokenizer is not None:
            assert all(isinstance(i, int) for i in tokenizer.eos_token_ids)


@FUZZ
@given(data=st.data())
def test_preprocessor_config(tmp_path, data):
    doc = PREPROCESSORS[data.draw(st.sampled_from(sorted(PREPROCESSORS)))]
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(doc))
    with replaced(path, data.draw(json_corruption(path))):
        loads_or_names(lambda: ImageProcessor.from_pretrained(tmp_path), "preprocessor_config.json")


def _with_sha(index: dict, data: bytes) -> bytes:
    """index.json with the shard's SHA-256 set to that of ``data``."""
    import hashlib

    index = copy.deepcopy(index)
    index["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    return json.dumps(index).encode()


@FUZZ
@given(data=st.data())
def test_training_checkpoint(trained, data):
    engine, directory = trained
    index_path, shard = directory / "s" / "index.json", directory / "s" / "rank_00000.safetensors"
    latest = directory / "latest"
    target = data.draw(st.sampled_from(["index.json", "index.json", "latest", "rank_00000.safetensors"]))
    if target == "index.json":
        with replaced(index_path, data.draw(json_corruption(index_path))):
            loads_or_names(lambda: engine.load_checkpoint(str(directory)), "index.json")
    elif target == "latest":
        tag = data.draw(st.one_of(st.sampled_from([b"", b"..", b".", b"../..", b"/etc", b"s/../s", b"latest",
                                                   b"s\x00", b"\xff\xfe", b"s" * 5000]), st.binary(max_size=8)))
        with replaced(latest, tag):
            loads_or_names(lambda: engine.load_checkpoint(str(directory)), "latest")
    else:  # the shard with its checksum updated, so the safetensors checks are what catches it
        corrupted = data.draw(corrupt_safetensors(shard.read_bytes()))
        index = json.loads(index_path.read_text())
        with replaced(shard, corrupted), replaced(index_path, _with_sha(index, corrupted)):
            loads_or_names(lambda: engine.load_checkpoint(str(directory)), "rank_00000.safetensors")
    engine.load_checkpoint(str(directory))  # the good checkpoint still loads afterwards


# ---- regressions: the minimal inputs hypothesis found against the loaders as they were -----------------


def rejects(load, name: str, error: type = ValueError, match: str = ""):
    """``load()`` raises exactly ``error`` naming ``name`` (and containing ``match``) within the time limit."""
    with time_limit(), pytest.raises(error) as info:
        load()
    message = str(info.value)
    assert type(info.value) is error and name in message and match in message, f"{type(info.value).__name__}: {message}"


def _short(value):
    """Test ids: the first bytes of a long input."""
    return repr(value)[:24] if isinstance(value, bytes) else None


def _config(model_dir, **changes) -> bytes:
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("data, match", [
    (b"null", "expected a JSON object"),  # was AttributeError: 'NoneType' object has no attribute 'get'
    (b"\x80{}", "not valid JSON"),  # was UnicodeDecodeError from read_text()
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # was RecursionError
    (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not valid JSON"),  # was int()'s digit-limit ValueError, unnamed
], ids=_short)
def test_config_json_not_a_json_object(model_dir, data, match):
    with replaced(model_dir / "config.json", data):
        rejects(lambda: load_model(model_dir), "config.json", match=match)


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": [64]}, "hidden_size=[64]"),  # was TypeError from int()
    ({"num_attention_heads": "false"}, "num_attention_heads='false'"),  # was int()'s ValueError, unnamed
    ({"vocab_size": float("nan")}, "vocab_size=nan"),  # was "cannot convert float NaN to integer"
    ({"num_hidden_layers": 2 ** 40}, "num_hidden_layers"),  # was a 2**40-entry tuple
    ({"rope_parameters": 5}, "RoPE parameters must be an object"),  # was TypeError: 'int' object is not iterable
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}, "rope_parameters": None}, "factor='2'"),
    ({"eos_token_id": "</s>"}, "eos_token_id='</s>'"),  # was int()'s ValueError, unnamed
    # a size the checkpoint cannot hold: was a 256 GB embedding allocated (or torch's RuntimeError)
    ({"vocab_size": 2 ** 30}, "describes a model of"),
])
def test_config_json_bad_values(model_dir, changes, match):
    with replaced(model_dir / "config.json", _config(model_dir, **changes)):
        rejects(lambda: load_model(model_dir), "config.json", match=match)


def test_config_json_of_another_shape_names_both_files(model_dir):
    """One layer more than the weights hold: load_weights' 'missing' error named neither file."""
    with replaced(model_dir / "config.json", _config(model_dir, num_hidden_layers=2)):
        rejects(lambda: load_model(model_dir), "model.safetensors", match="config.json")  # before allocating
    with replaced(model_dir / "config.json", _config(model_dir, intermediate_size=48)):
        rejects(lambda: load_model(model_dir), "model.safetensors", match="has shape")


def _header_edit(data: bytes, edit) -> bytes:
    header, body = _safetensors_parts(data)
    edit(header)
    return _pack_safetensors(header, body)


def _claim_2_60(header):
    header["model.norm.weight"].update(shape=[2 ** 60], data_offsets=[0, 2 ** 62])


def _swap_embedding_shape(header):
    header["model.embed_tokens.weight"]["shape"].reverse()


@pytest.mark.parametrize("corrupt, match", [
    # every case was the safetensors library's SafetensorError (or a ValueError naming no file)
    (lambda d: struct.pack("<Q", 2 ** 60) + d[8:], "header length"),
    (lambda d: struct.pack("<Q", len(d) - 7) + d[8:], "header length"),
    (lambda d: d[:5], "shorter than the 8-byte header length"),
    (lambda d: d[:len(d) // 2], "truncated"),
    (lambda d: d[:8] + b"[" + d[9:], "not UTF-8 JSON"),
    (lambda d: _header_edit(d, _claim_2_60), "model.norm.weight"),
    (lambda d: _header_edit(d, lambda h: h["model.norm.weight"].update(dtype="F16")), "data_offsets"),
    (lambda d: _header_edit(d, lambda h: h["model.norm.weight"].update(dtype="Q4")), "dtype 'Q4'"),
    (lambda d: _header_edit(d, lambda h: h["model.norm.weight"].update(shape=[-64])), "shape [-64]"),
    (lambda d: _header_edit(d, lambda h: h.update(__metadata__={"format": 5})), "__metadata__"),
    (lambda d: _header_edit(d, _swap_embedding_shape), "has shape (64, 320)"),  # load_weights' error, unnamed
])
def test_safetensors_corruptions(model_dir, corrupt, match):
    file = model_dir / "model.safetensors"
    with replaced(file, corrupt(file.read_bytes())):
        rejects(lambda: load_model(model_dir), "model.safetensors", match=match)


@pytest.mark.parametrize("weight_map", [
    None, ["model-00001-of-00003.safetensors"],  # were TypeError / AttributeError
    {"lm_head.weight": ["model-00001-of-00003.safetensors"]},  # was TypeError: unhashable type: 'list'
    {"lm_head.weight": "../../etc/passwd"},  # read /etc/passwd: SafetensorError "header too large"
    {"lm_head.weight": "/etc/passwd"},
    {"lm_head.weight": "config.json"},
])
def test_safetensors_index_bad_weight_maps(sharded_dir, weight_map):
    index = sharded_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = {**doc["weight_map"], **weight_map} if isinstance(weight_map, dict) else weight_map
    with replaced(index, json.dumps(doc).encode()):
        rejects(lambda: load_model(sharded_dir), "model.safetensors.index.json")


def test_safetensors_index_not_json(sharded_dir):
    index = sharded_dir / "model.safetensors.index.json"
    for data in (b"\x80", b"[" * 100_000, b"9" * 5000):  # were UnicodeDecodeError, RecursionError, ValueError
        with replaced(index, data):
            rejects(lambda: load_model(sharded_dir), "model.safetensors.index.json", match="not valid JSON")


def test_safetensors_headers_are_read_once_per_file(sharded_dir, monkeypatch):
    from tidal.models import loader

    calls = []
    read = loader.read_safetensors_header
    monkeypatch.setattr(loader, "read_safetensors_header", lambda file: calls.append(file) or read(file))
    load_model(sharded_dir)
    assert sorted(calls) == safetensors_files(sharded_dir)
    header = read(sharded_dir / "model-00001-of-00003.safetensors")
    tensors = load_file(str(sharded_dir / "model-00001-of-00003.safetensors"))
    assert {n: t.shape for n, t in header.items()} == {n: tuple(t.shape) for n, t in tensors.items()}


@pytest.mark.parametrize("name, data, match", [
    ("tokenizer.json", b"null", "not a valid tokenizer"),  # was the tokenizers library's bare Exception
    ("tokenizer_config.json", b"null", "expected an object"),  # was AttributeError
    ("tokenizer_config.json", b"", "not valid JSON"),  # was JSONDecodeError, unnamed
    ("tokenizer_config.json", b"\x80", "not valid JSON"),  # was UnicodeDecodeError
    ("generation_config.json", b"[" * 100_000, "not valid JSON"),  # was RecursionError
    ("tokenizer_config.json", b'{"eos_token": 5}', "eos_token"),  # was TypeError in token_to_id
    ("generation_config.json", b'{"eos_token_id": ["</s>"]}', "eos_token_id"),  # was accepted as an id
    ("config.json", b'{"eos_token_id": 1.5}', "eos_token_id"),  # was accepted as an id
], ids=_short)
def test_tokenizer_file_corruptions(model_dir, name, data, match):
    with replaced(model_dir / name, data):
        rejects(lambda: Tokenizer(str(model_dir)), name, match=match)


def test_tokenizer_chat_template_list(model_dir):
    """transformers writes several templates as [{"name", "template"}]: the "default" one is used
    (it was kept as a list, which failed on the first chat request)."""
    config = model_dir / "tokenizer_config.json"
    doc = {**json.loads(config.read_text()), "chat_template": [{"name": "tool_use", "template": "t"},
                                                               {"name": "default", "template": "{{ 'd' }}"}]}
    with replaced(config, json.dumps(doc).encode()):
        assert Tokenizer(str(model_dir)).chat_template == "{{ 'd' }}"


@pytest.mark.parametrize("data, match", [
    (b'{"image_processor_type": ["CLIPImageProcessor"]}', "not supported"),  # was TypeError: unhashable list
    (b"\x80{}", "not a readable JSON file"),  # was UnicodeDecodeError
    (b"[" * 100_000, "not a readable JSON file"),  # was RecursionError
    (b'{"size": ' + b"9" * 5000 + b"}", "not a readable JSON file"),  # was int()'s ValueError, unnamed
], ids=_short)
def test_preprocessor_config_corruptions(tmp_path, data, match):
    (tmp_path / "preprocessor_config.json").write_bytes(data)
    rejects(lambda: ImageProcessor.from_pretrained(tmp_path), "preprocessor_config.json", match=match)


def _index_edit(directory: Path, edit) -> bytes:
    index = json.loads((directory / "s" / "index.json").read_text())
    edit(index)
    return json.dumps(index).encode()


def _drop_first_shape(index):
    del index["params"][0]["shape"]


def _huge_param(index):
    index["params"][0].update(shape=[2 ** 50], numel=2 ** 50)


def _escaping_file(index):
    index["files"][0]["file"] = "../../../../../../etc/passwd"


@pytest.mark.parametrize("edit, match", [
    (lambda i: i.update(params=None), "'params' and 'files' must be lists"),  # was TypeError: not iterable
    (_drop_first_shape, "needs a unique name"),  # was KeyError: 'shape'
    (lambda i: i["files"][0].pop("sha256"), "file entry"),  # was KeyError: 'sha256'
    (lambda i: i.update(scheduler=[]), "'scheduler' must be an object"),  # was TypeError in load_state_dict
    (lambda i: i.update(scheduler={}), "'scheduler' state cannot be restored"),  # was KeyError
    (lambda i: i["counters"].pop("global_steps"), "counters"),  # was KeyError after the weights were loaded
    (_huge_param, "files hold"),  # was torch.empty(2**50): RuntimeError
    (_escaping_file, "file entry"),  # read /etc/passwd; its SHA-256 mismatch named only that file
    # was range(10**12) calls of _assemble: a hang
    (lambda i: i.update(experts={"ep_size": 10 ** 12, "files": [], "params": []}), "ep_rank"),
])
def test_training_checkpoint_index_corruptions(trained, edit, match):
    engine, directory = trained
    with replaced(directory / "s" / "index.json", _index_edit(directory, edit)):
        rejects(lambda: engine.load_checkpoint(str(directory)), "index.json", match=match)
    engine.load_checkpoint(str(directory))


def test_training_checkpoint_index_not_json(trained):
    engine, directory = trained
    for data in (b"null", b"\x80", b"[" * 100_000, b"9" * 5000):  # were AttributeError and leaked decode errors
        with replaced(directory / "s" / "index.json", data):
            rejects(lambda: engine.load_checkpoint(str(directory)), "index.json")


def test_training_checkpoint_latest_corruptions(trained):
    engine, directory = trained
    # "../..": index.json of a directory outside the checkpoint was looked for; b"\xbb": UnicodeDecodeError
    for tag in (b"../..", b"/etc", b"\xbb", b"s\x00"):
        with replaced(directory / "latest", tag):
            rejects(lambda: engine.load_checkpoint(str(directory)), "latest")
    with replaced(directory / "latest", b"no_such_tag"):
        rejects(lambda: engine.load_checkpoint(str(directory)), "latest", FileNotFoundError)


def test_training_checkpoint_shard_with_a_matching_checksum(trained):
    """A shard whose header no longer holds "master" (its SHA-256 updated to match): was KeyError."""
    engine, directory = trained
    shard, index_path = directory / "s" / "rank_00000.safetensors", directory / "s" / "index.json"
    header, body = _safetensors_parts(shard.read_bytes())
    header["masterX"] = header.pop("master")
    corrupted = _pack_safetensors(header, body)
    with replaced(shard, corrupted), replaced(index_path, _with_sha(json.loads(index_path.read_text()), corrupted)):
        rejects(lambda: engine.load_checkpoint(str(directory)), "rank_00000.safetensors", match="does not hold")
