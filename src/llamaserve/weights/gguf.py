"""llama.cpp GGUF checkpoints (`--model model.gguf`, or a directory holding one `.gguf`).

Weights: each tensor is dequantized by the `gguf` package (llama.cpp's own reference code), a
bounded block of rows at a time, straight into the model's dtype; the file is memory-mapped and
its pages are handed back after each block, so loading takes the dequantized model's memory
plus one block. llama.cpp stores q/k rows in the interleaved RoPE layout, which is Meta's (its
converter undoes Hugging Face's permutation), so they are used as they are.

Config and tokenizer: written once, from the file's metadata, as a small Hugging Face-style
directory (config.json, tokenizer.json, tokenizer_config.json, generation_config.json) next to
the converted-weight cache (or in ~/.cache/llamaserve/gguf), keyed by the file's path, size and
mtime. The model reads its config from there and the server its tokenizer and chat template,
through the same code as any Hugging Face checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from llamaserve.weights.errors import WeightsError
from llamaserve.weights.files import read_config
from llamaserve.weights.gguf_file import ROPE_FREQS, GGUFFile, meta_name
from llamaserve.weights.reader import CHUNK_BYTES, Part, TensorReader, file_mappings, release_pages

SIDECAR_SUBDIR = "llamaserve_gguf"
# Bump when what is written from the metadata changes: old sidecars are then rebuilt.
SIDECAR_VERSION = 1
_DONE = ".complete"


def find_gguf(path: Path) -> Path | None:
    """The .gguf file `path` names: itself, or the single .gguf in a directory (None if none)."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise WeightsError(f"{path}: holds {len(found)} .gguf files ({names}); pass the one to load as --model FILE")
    return found[0] if found else None


def default_sidecar_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamaserve" / "gguf"


def sidecar_dir(gguf_path: Path, cache_root: str | Path | None = None, opened: GGUFFile | None = None) -> Path:
    """The config/tokenizer directory of a GGUF file, written on first use (from `opened`
    if given: parsing a 128k-token vocabulary's metadata takes seconds)."""
    gguf_path = gguf_path.resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(json.dumps([SIDECAR_VERSION, str(gguf_path), st.st_size, st.st_mtime_ns]).encode())
    root = Path(cache_root).expanduser() / SIDECAR_SUBDIR if cache_root is not None else default_sidecar_root()
    final = root / f"{gguf_path.stem[:60]}-{key.hexdigest()[:16]}"
    if (final / _DONE).is_file():
        return final
    gf = opened or GGUFFile(gguf_path)
    try:
        gf.check_supported()
        _write_sidecar(gf, root, final)
    finally:
        if opened is None:
            gf.close()
    return final


def _write_sidecar(gf: GGUFFile, root: Path, final: Path) -> None:
    from llamaserve.weights.gguf_tokenizer import write_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        (tmp / "config.json").write_text(json.dumps(gf.hf_config(), indent=1))
        write_tokenizer(gf, tmp)
        (tmp / _DONE).write_text(str(gf.path))
        shutil.rmtree(final, ignore_errors=True)  # a partial one from a crash
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _DONE).is_file():  # another process finished it first: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class GGUFReader(TensorReader):
    format = "gguf"

    def __init__(self, path: Path, cache_root: str | Path | None = None) -> None:
        gguf_path = find_gguf(path)
        if gguf_path is None:
            raise WeightsError(f"{path}: no .gguf file")
        self.path = gguf_path
        self.config_file = str(gguf_path)
        self._file = GGUFFile(gguf_path)
        try:
            self._file.check_supported()
            self.sidecar = sidecar_dir(gguf_path, cache_root, self._file)
        except BaseException:
            self._file.close()
            raise
        self.args, _ = read_config(self.sidecar / "config.json", "hf")
        self._source: dict[str, str] = {}
        for name in self._file.tensors:
            if name == ROPE_FREQS:
                continue  # already in the config as rope_scaling
            meta = meta_name(name)
            if meta is None:
                raise WeightsError(f"{gguf_path}: unexpected tensor {name} (not part of a Llama model)")
            self._source[meta] = name
        self._shapes = {m: self._file.torch_shape(g) for m, g in self._source.items()}
        self._ranges: list[tuple[int, int]] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def where(self, name: str) -> str:
        return str(self.path)

    def display_name(self, name: str) -> str:
        return self._source.get(name, name)

    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        from gguf.quants import dequantize

        t = self._file.tensors[self._source[name]]
        if self._ranges is None:
            self._ranges = file_mappings(self.path)
        rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        lo, hi = (part.start, part.stop) if part is not None and part.dim == 0 else (0, rows.shape[0])
        row_bytes = max(1, 4 * int(t.n_elements) // max(1, rows.shape[0]))  # dequantized float32 row
        # The package's dequantizers make a few temporaries of the output's size: smaller blocks.
        step = max(1, CHUNK_BYTES // 4 // row_bytes)
        out = dst.view(-1, dst.shape[-1]) if dst.dim() > 1 else dst.view(1, -1)
        for r in range(lo, hi, step):
            block = rows[r:min(r + step, hi)]
            with warnings.catch_warnings():  # F32 comes back as a read-only view of the map
                warnings.simplefilter("ignore")
                values = torch.from_numpy(np.ascontiguousarray(dequantize(block, t.tensor_type), dtype=np.float32))
            values = values.view(block.shape[0], -1)
            if part is not None and part.dim == 1:
                values = values[:, part.start:part.stop]
            out[r - lo:r - lo + block.shape[0]].copy_(values)
            self._release(block)

    def _release(self, block: np.ndarray) -> None:
        with warnings.catch_warnings():  # a read-only memmap: torch warns, but nothing writes to it
            warnings.simplefilter("ignore")
            release_pages(torch.from_numpy(block), self._ranges or [])

    def close(self) -> None:
        self._file.close()
