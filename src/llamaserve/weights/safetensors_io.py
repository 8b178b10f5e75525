"""Streaming safetensors writer and zero-copy mmap reader.

`safetensors.torch.save_file` turns every tensor into a `bytes` copy first, which doubles the
peak memory of a repack or cache build; this writer streams each tensor's bytes to the file.
The reader maps the file once (copy-on-write) so a tensor's pages are only read when touched.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # --quantize fp8 (weights/fp8.py)
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
# A header larger than this is not a safetensors file (the format itself caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, malformed or holds an unsupported dtype."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def build_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded so tensor data starts 8-aligned."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_TO_ST:
            raise SafetensorsError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` to `path` atomically (temp file + rename); returns the file size."""
    path = Path(path)
    # Larger element sizes first keeps every tensor aligned to its element size.
    ordered = dict(sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(build_header(ordered, metadata))
            for t in ordered.values():
                if t.numel():
                    f.write(_tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, byte offset where tensor data starts)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is truncated (no header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype = _ST_TO_DTYPE[entry["dtype"]]
            numel = 1
            for d in entry["shape"]:
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
        if end - start != numel * dtype.itemsize or end > data_len or start < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} needs bytes {start}-{end} but the file holds {data_len} data bytes "
                "(truncated or corrupted)"
            )
    return header, metadata, 8 + n


def mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of `path` as views of one private (copy-on-write) memory map of the file."""
    path = Path(path)
    header, metadata, data_start = read_header(path)
    size = path.stat().st_size
    if size == data_start:
        buf = torch.empty(0, dtype=torch.uint8)
    else:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        buf = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype = _ST_TO_DTYPE[entry["dtype"]]
        raw = buf[data_start + start : data_start + end]
        if (data_start + start) % dtype.itemsize:
            raw = raw.clone()  # misaligned for its dtype (foreign writer): copy this one tensor
        out[name] = raw.view(dtype).view(entry["shape"])
    return out, metadata
