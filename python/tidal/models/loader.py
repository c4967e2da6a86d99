"""Load a Hugging Face model directory (config.json + safetensors) into a tidal model, and save one back.

Tensors are read lazily, one shard and one tensor at a time (``safetensors.safe_open``), and copied
straight into the model's (fused) parameters in the requested dtype and device, so peak extra memory
is one tensor, not one checkpoint.

Every file is untrusted input: each safetensors header is parsed and checked against the file's size
(:func:`read_safetensors_header`) before the ``safetensors`` library maps the file, and the model
config.json describes is built on the meta device and compared with what the files hold before its
parameters are allocated. A malformed file is a ValueError naming it.
"""

import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tidal.models.config import ModelConfig, read_json
from tidal.models.registry import get_model_class

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROGRESS_MIN_BYTES = 1 << 30  # NOTE(models): below ~1 GB loading takes seconds; a bar is noise
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
#: Bytes per element of the safetensors dtypes torch reads.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header: its dtype name, shape, and byte range in the data that
    follows the header."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """``"auto"`` -> the config's dtype (float32 when it has none); a name or torch.dtype -> itself."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype={dtype} is not supported; expected float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return config.dtype or torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected 'auto', 'float32', 'bfloat16', "
                         f"'float16' or a torch.dtype")
    return _DTYPE_NAMES[dtype]


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names, in name order. FileNotFoundError naming what is missing."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} is not a safetensors index: it needs a 'weight_map' object of "
                             f"tensor name -> shard file")
        for name in weight_map.values():
            if not _is_shard_name(name):
                raise ValueError(f"{str(index)!r} names shard {name!r}: shards must be .safetensors files inside "
                                 f"{str(path)!r}")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {str(file)!r} named by {str(index)!r} does not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r} "
                            f"(only safetensors checkpoints are supported)")


def _is_shard_name(name) -> bool:
    """A relative ``*.safetensors`` path that stays inside the model directory (checked on the name
    alone: a Hugging Face cache's shards are symlinks that resolve elsewhere)."""
    return (isinstance(name, str) and name.endswith(".safetensors") and "\x00" not in name
            and not os.path.isabs(name) and ".." not in Path(name).parts)


def read_safetensors_header(file: str | Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, read from its header alone and checked against the
    file's size before anything the header sizes is allocated or read.

    ValueError naming the file when it is shorter than its 8-byte little-endian header length, the
    length runs past the file or past 100 MB, the header is not UTF-8 JSON holding an object of
    ``{"dtype", "shape", "data_offsets"}`` entries (and an optional ``__metadata__`` of strings), a
    dtype is unknown, a shape is not a list of non-negative integers, or the ``data_offsets`` do not
    tile the data after the header exactly (no gap, no overlap, to the file's last byte), each range
    ``dtype size x number of elements`` long. FileNotFoundError when it does not exist.
    """
    file = Path(file)

    def bad(what: str) -> ValueError:
        return ValueError(f"{str(file)!r} is not a valid safetensors file: {what}")

    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"it is {len(prefix)} bytes long, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise bad(f"its header length {length} is past the file's {size - 8} bytes after it or the "
                          f"{_MAX_HEADER_BYTES}-byte limit (a truncated or corrupt file)")
            blob = f.read(length)
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(file)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{str(file)!r} cannot be read: {e}") from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"its header is not UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("its __metadata__ is not an object of strings")
    data_size = size - 8 - length
    tensors = {name: _tensor_info(name, entry, bad) for name, entry in header.items()}
    at = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != at:
            raise bad(f"tensor {name!r} starts at byte {t.begin} of the data, expected {at} (the tensors must "
                      f"follow each other without gap or overlap)")
        at = t.end
    if at != data_size:
        raise bad(f"its tensors end at byte {at} of the data, the file holds {data_size} (truncated or padded)")
    return tensors


def _tensor_info(name: str, entry, bad) -> TensorInfo:
    if not isinstance(entry, dict):
        raise bad(f"tensor {name!r} is described by a JSON {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise bad(f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(_ITEMSIZE)}")

    def is_count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    # NOTE(models): the product of the non-zero dims is bounded too: torch multiplies them in order,
    # so [2**62, 4, 0] overflows there although it has no element
    if not isinstance(shape, list) or not all(is_count(d) for d in shape) or \
            math.prod(max(d, 1) for d in shape) >= 1 << 63:
        raise bad(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets) or \
            offsets[0] > offsets[1]:
        raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.numel * _ITEMSIZE[dtype] != info.end - info.begin:
        raise bad(f"tensor {name!r} of dtype {dtype} and shape {shape} takes {info.numel * _ITEMSIZE[dtype]} "
                  f"bytes, its data_offsets {offsets} span {info.end - info.begin}")
    return info


def _read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a file whose header :func:`read_safetensors_header` accepted; the
    library's own errors (a file changed meanwhile) become ValueErrors naming it."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{str(file)!r} cannot be read: {e}") from None
    with handle as f:
        for name in f.keys():
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{str(file)!r}: tensor {name!r} cannot be read: {e}") from None
            yield name, tensor


def iter_safetensors(files: list[Path], progress: bool | None = None,
                     headers: dict[Path, dict[str, TensorInfo]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from each file in turn, each tensor read only when reached, each
    file's header checked first (:func:`read_safetensors_header`; ``headers`` holds those already
    read, by file).

    ``progress=None`` shows a tqdm bar when the files exceed 1 GB, stderr is a terminal and tqdm is
    installed; True/False force it on/off (still needs tqdm).
    """
    if progress is None:
        progress = sum(f.stat().st_size for f in files) > _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                       desc="Loading weights", file=sys.stderr)
    try:
        for file in files:
            if headers is None or file not in headers:
                read_safetensors_header(file)
            for name, tensor in _read_tensors(file):
                yield name, tensor
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
    finally:
        if bar is not None:
            bar.close()


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
               quantization: str | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model a Hugging Face directory describes and load its weights.

    Parameters
    ----------
    path : str or Path
        Directory with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json``
        and its shards).
    dtype : "auto", "float32", "bfloat16", "float16" or torch.dtype
        Parameter dtype; "auto" takes the config's ``dtype`` / ``torch_dtype`` (float32 if absent).
    device : torch.device or str
        Where the parameters go.
    quantization : None, "int8", "int4", "fp8", "gptq", "awq" or "compressed-tensors"
        Serve the decoder's dense linear layers quantized (tidal.quant): a float checkpoint's weights
        are rounded to int8, int4 (groups of 128) or FP8 as they load; a checkpoint whose config.json
        has a ``quantization_config`` is read in its published layout whatever this says (None), or
        must agree with it.

    Returns
    -------
    (model, config)
        The model in eval mode, and its :class:`ModelConfig`. Under ``tidal.zero.Init`` the
        parameters are on the meta device and the weights are read by ``tidal.initialize``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    config = ModelConfig.from_pretrained(path)
    config_file = str(path / "config.json")
    files = safetensors_files(path)
    headers = {file: read_safetensors_header(file) for file in files}
    weights_file = str(files[0] if len(files) == 1 else path / "model.safetensors.index.json")
    model_class = get_model_class(config.multimodal_architecture or config.architecture)
    dtype = resolve_dtype(dtype, config)
    from tidal import quant, zero

    qconfig = quant.resolve(quantization, config.hf_config)
    if qconfig is not None and zero.is_active():
        raise ValueError(f"quantization={quantization!r}: quantized models are for serving, not tidal.zero.Init")

    # shapes only, to compare with the files before anything is allocated; under tidal.zero.Init this
    # is the model returned: tidal.initialize reads each tensor into the shards
    try:
        meta = model_class(config, dtype=dtype, device="meta")
    except (RuntimeError, ValueError, TypeError, ArithmeticError) as e:
        raise ValueError(f"{config_file!r} describes a model that cannot be built: {e}") from None
    if qconfig is not None and qconfig.is_prequantized:
        quant.prepare_model(meta, qconfig)  # its codes are buffers: the float parameters left are a lower bound
    num_params = sum(p.numel() for p in meta.parameters())
    num_values = sum(t.numel for header in headers.values() for t in header.values())
    if num_params > num_values:
        raise ValueError(f"{config_file!r} describes a model of {num_params} parameters; {weights_file!r} holds "
                         f"{num_values} values")
    if zero.is_active():
        meta._tidal_checkpoint_files = files
        return meta.eval(), config
    del meta
    model = model_class(config, dtype=dtype, device=device)
    if qconfig is not None and qconfig.is_prequantized:
        quant.prepare_model(model, qconfig)
    reading = {}  # the tensor load_weights was given last (None once all were), or that a file failed

    def weights():
        try:
            for name, tensor in iter_safetensors(files, headers=headers):
                reading["name"] = name
                yield name, tensor
        except ValueError:  # raised by the reading only: the consumer's errors never enter a generator
            reading["failed"] = True
            raise
        reading["name"] = None

    try:
        model.load_weights(weights() if qconfig is None or not qconfig.is_prequantized else
                           quant.read_tensors(weights(), qconfig))
    except ValueError as e:
        if reading.get("failed") or "name" not in reading:  # a file's own error, naming it
            raise
        name = reading["name"]
        where = str(next(f for f in files if name in headers[f])) if name is not None else weights_file
        raise ValueError(f"{where!r} does not fit the model {config_file!r} describes: {e}") from None
    if qconfig is not None and qconfig.act_order:
        quant.finalize_act_order_(model)
    if qconfig is not None and not qconfig.is_prequantized:
        quant.quantize_model_(model, qconfig)
    return model.eval(), config


def save_model(model: torch.nn.Module, path: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write ``model`` as a Hugging Face directory: config.json (the model's ``config.hf_config``,
    with ``dtype`` set to the model's) and safetensors in Hugging Face's unfused names, one
    ``model.safetensors`` or, past ``max_shard_bytes``, shards plus ``model.safetensors.index.json``.
    ``transformers``' ``from_pretrained`` and :func:`load_model` both read the result."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in model.hf_state_dict():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().to("cpu", copy=True).contiguous()  # safetensors refuses shared storage
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype_name = {v: k for k, v in _DTYPE_NAMES.items()}[model.dtype]
    raw = {**model.config.hf_config, "dtype": dtype_name}
    raw.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
