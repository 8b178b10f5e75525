"""Meta's downloads: `consolidated.NN.pth` tensor-parallel shards plus `params.json`.

Merge rules (SPEC section 4): norms are replicated; wq wk wv w1 w3 concatenate on dim 0; wo w2
on dim 1; `output` on dim 0; `tok_embeddings` on dim 0 for Llama 3 (vocab-parallel) but on dim 1
for Llama 2 (its reference split the embedding dimension).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llamaserve.config import ConfigError, read_json
from llamaserve.weights.errors import WeightsError
from llamaserve.weights.files import PthFile, read_config
from llamaserve.weights.reader import Part, TensorReader, copy_into, narrow, release_pages

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
# Llama 2 checkpoints carry their precomputed RoPE table; the model computes its own.
IGNORED = frozenset({"rope.freqs"})
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def shard_files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if SHARD_RE.fullmatch(p.name)), key=lambda p: int(SHARD_RE.fullmatch(p.name).group(1)))


def merge_dim(name: str, llama3_vocab: bool) -> int | None:
    """The dimension Meta's shards split `name` on, or None when it is replicated."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight":
        return 0 if llama3_vocab else 1
    if name == "output.weight":
        return 0
    kind = name.rsplit(".", 2)[-2]
    if kind in ("wq", "wk", "wv", "w1", "w3"):
        return 0
    if kind in ("wo", "w2"):
        return 1
    return None


class MetaReader(TensorReader):
    format = "meta"

    def __init__(self, directory: Path) -> None:
        self.path = directory
        files = shard_files(directory)
        numbers = [int(SHARD_RE.fullmatch(p.name).group(1)) for p in files]
        if numbers != list(range(len(files))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise WeightsError(
                f"{directory}: shard consolidated.{missing[0]:02d}.pth is missing "
                f"(found {', '.join(p.name for p in files)})"
            )
        params_path = directory / "params.json"
        self.config_file = str(params_path)
        self._shards = [PthFile(p) for p in files]
        self._check_same_names()
        names = [k for k in self._shards[0].tensors if k not in IGNORED]

        overrides = {}
        if _raw_vocab(params_path) in (-1, None):
            # Llama 2 params.json says vocab_size -1 (the tokenizer decides); the tensors know.
            # `output` is split on the vocab dim in every family; Llama 2's embedding is split on
            # dim 1, so each of its shards holds the whole vocab.
            if "output.weight" in names:
                overrides["vocab_size"] = sum(int(s.tensors["output.weight"].shape[0]) for s in self._shards)
            elif "tok_embeddings.weight" in names:
                overrides["vocab_size"] = int(self._shards[0].tensors["tok_embeddings.weight"].shape[0])
        args, _ = read_config(params_path, "meta", overrides)
        if "output.weight" not in names:
            # Meta's small models (Llama 3.2 1B/3B) tie the output head to the embedding.
            args = args.replace(tie_word_embeddings=True)
        self.args = args
        self.llama3 = args.is_llama3_vocab
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dims: dict[str, int | None] = {}
        for name in names:
            self._dims[name] = merge_dim(name, self.llama3)
            self._shapes[name] = self._merged_shape(name)

    def _check_same_names(self) -> None:
        first = self._shards[0]
        ref = set(first.tensors) - IGNORED
        for shard in self._shards[1:]:
            have = set(shard.tensors) - IGNORED
            if have == ref:
                continue
            missing, extra = sorted(ref - have), sorted(have - ref)
            layer = _first_layer(missing + extra)
            if layer is not None:
                count = lambda keys: sum(1 for k in keys if k.startswith(f"layers.{layer}."))  # noqa: E731
                head = (
                    f"{shard.path}: layer {layer} has {count(have)} tensors but {first.path.name} "
                    f"has {count(ref)}; the shards do not belong together"
                )
            else:
                head = f"{shard.path}: holds different tensors than {first.path.name}"
            details = []
            if missing:
                details.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if extra:
                details.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
            raise WeightsError(f"{head} ({'; '.join(details)})")

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        dim = self._dims[name]
        first = self._shards[0]
        ref = tuple(first.tensors[name].shape)
        for shard in self._shards[1:]:
            got = tuple(shard.tensors[name].shape)
            if got != ref:
                how = "replicated" if dim is None else f"split on dim {dim}"
                raise WeightsError(
                    f"{shard.path}: {name} has shape {got} but {first.path.name} has {ref}; "
                    f"the shards of a {how} tensor must all have the same shape"
                )
        if dim is None:
            return ref
        if len(ref) <= dim:
            raise WeightsError(f"{first.path}: {name} has shape {ref}, expected at least {dim + 1} dimensions")
        merged = list(ref)
        merged[dim] = ref[dim] * len(self._shards)
        return tuple(merged)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def where(self, name: str) -> str:
        return str(self._shards[0].path)

    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        dim = self._dims[name]
        if dim is None:
            shard = self._shards[0]
            copy_into(dst, narrow(shard.tensors[name], part), lambda t: release_pages(t, shard.ranges))
            return
        offset = 0
        for shard in self._shards:
            src = shard.tensors[name]
            width = src.shape[dim]
            lo, hi, out_at = 0, width, offset
            if part is not None and part.dim == dim:
                lo, hi = max(part.start - offset, 0), min(part.stop - offset, width)
                out_at = max(offset - part.start, 0)
            elif part is not None:
                src = narrow(src, part)
            offset += width
            if hi <= lo:
                continue  # this shard holds nothing of the requested part
            piece = src.narrow(dim, lo, hi - lo)
            copy_into(dst.narrow(dim, out_at, hi - lo), piece, lambda t, s=shard: release_pages(t, s.ranges))

    def close(self) -> None:
        self._shards = []


def _raw_vocab(params_path: Path):
    try:
        return read_json(params_path).get("vocab_size")
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None


def _first_layer(names: list[str]) -> int | None:
    for n in names:
        m = _LAYER_RE.match(n)
        if m:
            return int(m.group(1))
    return None
