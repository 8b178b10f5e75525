"""Repack Meta's tensor-parallel shards (`consolidated.NN.pth`) into chunks of N layers.

Output: `layers_{a}-{b}.pth` (or `.safetensors`) holding the merged, full tensors of layers a..b
under their Meta names; tok_embeddings / norm / output go in the first chunk; params.json and
tokenizer.model are copied. Memory stays bounded by the largest output chunk: the shards are
memory-mapped and re-opened for every chunk, so only the pages of the current chunk are ever
resident, next to the merged copy that is being written.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaserve.config import ConfigError, ModelArgs, read_json
from llamaserve.progress import Progress
from llamaserve.umask import as_if_created
from llamaserve.weights.layout import expected_shapes
from llamaserve.weights.reader import copy_into, file_mappings, release_pages
from llamaserve.weights.safetensors_io import mmap_safetensors, write_safetensors

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
CHUNK_RE = re.compile(r"layers_(\d+)-(\d+)\.(pth|safetensors)")
DEFAULT_CHUNK_SIZE = 5
FORMATS = ("pth", "safetensors")
COPIED_FILES = ("params.json", "tokenizer.model")

# Meta's model-parallel layers: ColumnParallelLinear splits output rows (dim 0),
# RowParallelLinear splits input columns (dim 1); norms are replicated on every shard.
_ROW_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_COL_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")
_REPLICATED = ("norm.weight", "rope.freqs")


class RepackError(ValueError):
    """The input checkpoint or the repack settings are unusable; the message names the problem."""


@dataclass(frozen=True)
class ShardSet:
    files: list[Path]
    args: ModelArgs
    keys: list[str]
    cat_dims: dict[str, int | None]  # None = replicated (take shard 0's copy)
    shapes: dict[str, tuple[int, ...]]  # merged shapes
    dtype: torch.dtype


def find_shards(in_dir: Path) -> list[Path]:
    """The `consolidated.NN.pth` files of `in_dir` in order; gaps in NN are an error."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise RepackError(f"{in_dir}: input directory does not exist")
    found = {}
    for p in in_dir.iterdir():
        m = SHARD_RE.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise RepackError(f"{in_dir}: no Meta shards (consolidated.NN.pth) found")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise RepackError(f"{in_dir}: missing shard(s) {names} (found {len(found)} of {max(found) + 1})")
    return [found[i] for i in sorted(found)]


def _open_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip / pickle
        raise RepackError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RepackError(f"{path}: expected a dict of tensors")
    return sd


def _cat_dim(key: str, shard_shape: tuple[int, ...], n: int, args: ModelArgs) -> int | None:
    if n == 1 or key.endswith(_REPLICATED):
        return None
    if key.endswith(_ROW_SPLIT):
        return 0
    if key.endswith(_COL_SPLIT):
        return 1
    if key == "tok_embeddings.weight":
        # Llama 3 shards the vocabulary (VocabParallelEmbedding); Llama 2 the embedding dim.
        if len(shard_shape) == 2 and shard_shape[1] * n == args.dim and shard_shape[1] != args.dim:
            return 1
        return 0
    raise RepackError(f"tensor {key!r} is not part of a Llama checkpoint; cannot tell how to merge it")


def inspect_shards(in_dir: Path) -> ShardSet:
    """Read params.json and every shard's metadata (no tensor data) and check they agree."""
    in_dir = Path(in_dir)
    files = find_shards(in_dir)
    try:
        params = read_json(in_dir / "params.json")
        args = ModelArgs.from_meta_params(params, source=str(in_dir / "params.json"))
    except ConfigError as exc:
        raise RepackError(str(exc)) from None
    shard_meta = []
    for f in files:
        sd = _open_shard(f)
        shard_meta.append({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
        del sd
    gc.collect()

    keys = list(shard_meta[0])
    for f, meta in zip(files[1:], shard_meta[1:]):
        if set(meta) != set(keys):
            extra = sorted(set(meta) ^ set(keys))[:3]
            raise RepackError(f"{f}: holds different tensors than {files[0].name} (e.g. {extra}); mixed checkpoints?")
    dtypes = {dt for meta in shard_meta for _, dt in meta.values()}
    if len(dtypes) != 1:
        raise RepackError(f"{in_dir}: shards mix dtypes {sorted(map(str, dtypes))}")

    n = len(files)
    cat_dims, shapes = {}, {}
    for key in keys:
        for f, meta in zip(files[1:], shard_meta[1:]):
            if meta[key][0] != shard_meta[0][key][0]:
                raise RepackError(
                    f"tensor {key!r} has shape {list(meta[key][0])} in {f.name} but "
                    f"{list(shard_meta[0][key][0])} in {files[0].name}: mixed shapes"
                )
        shape = shard_meta[0][key][0]
        dim = _cat_dim(key, shape, n, args)
        cat_dims[key] = dim
        shapes[key] = shape if dim is None else tuple(s * n if i == dim else s for i, s in enumerate(shape))

    # Llama 2's params.json says vocab_size -1: the embedding's rows are the truth.
    if "tok_embeddings.weight" in shapes and params.get("vocab_size", -1) in (-1, None):
        args = args.replace(vocab_size=shapes["tok_embeddings.weight"][0])
    want = expected_shapes(args)
    for key, shape in want.items():
        if key not in shapes:
            raise RepackError(f"{in_dir}: tensor {key!r} is missing from the shards (params.json has n_layers={args.n_layers})")
        if tuple(shapes[key]) != tuple(shape):
            raise RepackError(
                f"tensor {key!r} merges to shape {list(shapes[key])} but params.json implies {list(shape)}: "
                "mixed shapes or wrong params.json"
            )
    extra = [k for k in keys if k not in want and not k.endswith(_REPLICATED)]
    if extra:
        raise RepackError(f"{in_dir}: unexpected tensors {extra[:3]} (beyond params.json's {args.n_layers} layers?)")
    return ShardSet(files, args, keys, cat_dims, shapes, dtypes.pop())


def chunk_ranges(n_layers: int, chunk_size: int) -> list[tuple[int, int]]:
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size > n_layers:
        raise RepackError(f"chunk size must be between 1 and the model's {n_layers} layers, got {chunk_size}")
    return [(a, min(a + chunk_size, n_layers) - 1) for a in range(0, n_layers, chunk_size)]


def chunk_filename(start: int, end: int, fmt: str = "pth") -> str:
    return f"layers_{start}-{end}.{fmt}"


def _layer_of(key: str) -> int | None:
    if key.startswith("layers."):
        return int(key.split(".", 2)[1])
    return None


# Llama 2 shards carry the RoPE frequency buffer; it is derived from params.json, no loader reads
# it, and ours refuses unknown tensors in repacked chunks, so it is left out of the output.
DROPPED = ("rope.freqs",)


def _chunk_keys(shards: ShardSet, start: int, end: int, first: bool) -> list[str]:
    return [
        k for k in shards.keys
        if k not in DROPPED
        and ((_layer_of(k) is None and first) or (_layer_of(k) is not None and start <= _layer_of(k) <= end))
    ]


def _merge_chunk(shards: ShardSet, keys: list[str]) -> dict[str, torch.Tensor]:
    opened = [_open_shard(f) for f in shards.files]
    mappings = [file_mappings(f) for f in shards.files]
    out = {}
    for key in keys:
        dim = shards.cat_dims[key]
        pieces = [opened[0][key]] if dim is None else [sd[key] for sd in opened]
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        merged = torch.empty(shape, dtype=pieces[0].dtype)
        offset = 0
        for piece, ranges in zip(pieces, mappings):
            target = merged if dim is None else merged.narrow(dim, offset, piece.shape[dim])
            # Each copied piece's file pages are dropped at once: whether the kernel would have
            # reclaimed them is up to memory pressure, and the bound must not depend on it.
            copy_into(target, piece, lambda t, r=ranges: release_pages(t, r))
            offset += 0 if dim is None else piece.shape[dim]
        out[key] = merged
    del opened
    gc.collect()
    return out


def _save_chunk(path: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    if fmt == "safetensors":
        write_safetensors(path, tensors, {"format": "pt", "producer": "llamaserve repack"})
        return
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)


def load_chunk(path: Path) -> dict[str, torch.Tensor]:
    """A repacked chunk (either format), memory-mapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return mmap_safetensors(path)[0]
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _verify_chunk(path: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype, float]]) -> None:
    try:
        loaded = load_chunk(path)
    except Exception as exc:
        raise RepackError(f"{path}: written chunk does not load back ({exc})") from None
    mappings = file_mappings(path)
    if set(loaded) != set(expected):
        raise RepackError(f"{path}: written chunk holds {len(loaded)} tensors, expected {len(expected)}")
    for key, (shape, dtype, checksum) in expected.items():
        t = loaded[key]
        got = t.sum(dtype=torch.float64).item()
        release_pages(t, mappings)
        same_sum = got == checksum or (math.isnan(got) and math.isnan(checksum))
        if tuple(t.shape) != shape or t.dtype != dtype or not same_sum:
            raise RepackError(f"{path}: tensor {key!r} differs from what was written")
    del loaded
    gc.collect()


def _prepare_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RepackError(f"{out_dir}: output path exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise RepackError(f"{out_dir}: output directory is not empty (pass --force to replace it)")


def _install_output(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished temp dir into place; the old contents go only once the new are there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def repack(
    in_dir: str | Path,
    out_dir: str | Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fmt: str = "pth",
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Repack the Meta shards of `in_dir` into `out_dir`; returns the chunk paths written."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise RepackError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _prepare_output(out_dir, force)
    shards = inspect_shards(in_dir)
    ranges = chunk_ranges(shards.args.n_layers, chunk_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    as_if_created(tmp_dir, directory=True)  # mkdtemp's 0700 would hide the checkpoint from other users
    written = []
    try:
        bar = Progress(f"repack {in_dir.name}", len(ranges), "chunks", shown=progress)
        for i, (start, end) in enumerate(ranges):
            name = chunk_filename(start, end, fmt)
            tensors = _merge_chunk(shards, _chunk_keys(shards, start, end, first=i == 0))
            expected = {k: (tuple(t.shape), t.dtype, t.sum(dtype=torch.float64).item()) for k, t in tensors.items()}
            _save_chunk(tmp_dir / name, tensors, fmt)
            del tensors
            gc.collect()
            _verify_chunk(tmp_dir / name, expected)
            written.append(out_dir / name)
            bar.update(1, detail=f"wrote {name}")
        bar.close()
        for extra in COPIED_FILES:
            if (in_dir / extra).is_file():
                shutil.copy2(in_dir / extra, tmp_dir / extra)
        _install_output(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return written
