"""Per-tensor access to a checkpoint in Meta layout, whatever format it is stored in.

A `TensorReader` answers the full (merged, Meta-layout) shape of every tensor without reading
data, and copies one tensor, or one slice of it (`Part`, e.g. a tensor-parallel rank's rows),
into a fresh tensor of the wanted dtype and device. Nothing else is materialised: sources are
memory-mapped, copied in bounded chunks, and the source pages are handed back to the kernel
right after each chunk, so peak resident memory is the target model plus one chunk.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llamaserve.config import ModelArgs

# Copy granularity: bounds the extra resident memory of a conversion, whatever the tensor size.
CHUNK_BYTES = 64 << 20
_MADV_DONTNEED = 4


@dataclass(frozen=True)
class Part:
    """Elements [start, stop) of dimension `dim` of a tensor (its full, merged shape)."""

    dim: int
    start: int
    stop: int

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = self.stop - self.start
        return tuple(out)


# ---- releasing pages of memory-mapped files -----------------------------------------------

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: pages are simply left to the kernel
    _madvise = None


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process maps `path` (Linux; empty elsewhere)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == real:
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def release_pages(t: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Drop the resident pages behind `t` if (and only if) they belong to a mapped file.

    Only file-backed pages are dropped: they are re-read from the file if touched again, so this
    never changes data. Anonymous memory is never touched (MADV_DONTNEED would zero it).
    """
    if _madvise is None or not ranges or t.numel() == 0 or t.device.type != "cpu":
        return
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    hi = lo + span * t.element_size()
    page = mmap.PAGESIZE
    for m_lo, m_hi in ranges:
        if lo < m_hi and hi > m_lo:
            a = max(m_lo, lo // page * page)
            b = min(m_hi, -(-hi // page) * page)
            if b > a:
                _madvise(a, b - a, _MADV_DONTNEED)


def copy_into(dst: torch.Tensor, src: torch.Tensor, release: Callable[[torch.Tensor], None]) -> None:
    """dst.copy_(src) in dim-0 chunks of about CHUNK_BYTES, releasing each source chunk."""
    if src.dim() == 0 or src.shape[0] <= 1:
        dst.copy_(src)
        release(src)
        return
    row_bytes = max(1, src[0].numel() * src.element_size())
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, src.shape[0], step):
        piece = src[i : i + step]
        dst[i : i + step].copy_(piece)
        release(piece)


# ---- readers ------------------------------------------------------------------------------


class TensorReader(ABC):
    """A checkpoint opened for per-tensor reading; use as a context manager or call close()."""

    format: str
    path: Path | None
    args: ModelArgs
    config_file: str  # the file the hyper-parameters came from, for error messages

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's full Meta-layout name and merged shape (no data is read)."""

    @abstractmethod
    def where(self, name: str) -> str:
        """The file that holds (or should hold) a tensor, for error messages."""

    def display_name(self, name: str) -> str:
        """How the file itself names a tensor (Meta names unless the format has its own)."""
        return name

    @abstractmethod
    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        """Copy the tensor (or its `part`) into `dst`, which already has the right shape."""

    def read(
        self,
        name: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        part: Part | None = None,
    ) -> torch.Tensor:
        """A new tensor (never a view of the file) holding `name`, or the `part` of it."""
        shape = self.shapes()[name]
        if part is not None:
            if not 0 <= part.start < part.stop <= shape[part.dim]:
                raise ValueError(f"{name}: part {part} is outside shape {shape}")
            shape = part.shape_of(shape)
        dst = torch.empty(shape, dtype=dtype, device=device)
        self._fill(name, dst, part)
        return dst

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def narrow(t: torch.Tensor, part: Part | None) -> torch.Tensor:
    return t if part is None else t.narrow(part.dim, part.start, part.stop - part.start)


class StateDictReader(TensorReader):
    """In-memory tensors (the built-in model, tests) behind the same interface."""

    def __init__(self, args: ModelArgs, tensors: dict[str, torch.Tensor], fmt: str = "builtin") -> None:
        self.format = fmt
        self.path = None
        self.args = args
        self.config_file = "<in memory>"
        self._tensors = tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def where(self, name: str) -> str:
        return "<in memory>"

    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        dst.copy_(narrow(self._tensors[name], part))
