"""Hugging Face downloads: `config.json` plus `model.safetensors` or sharded safetensors with
`model.safetensors.index.json`. Names are mapped to Meta's, and q/k rows un-permuted (HF stores
each head's RoPE pairs as two halves; Meta's layout interleaves them)."""

from __future__ import annotations

from pathlib import Path

import torch

from llamaserve.config import ConfigError, read_json
from llamaserve.weights.errors import WeightsError
from llamaserve.weights.files import SafetensorsFile, read_config
from llamaserve.weights.layout import hf_name_to_meta, hf_to_meta_rows, meta_name_to_hf
from llamaserve.weights.reader import CHUNK_BYTES, Part, TensorReader, copy_into, narrow, release_pages

INDEX_NAME = "model.safetensors.index.json"


def _ignored(hf_name: str) -> bool:
    # Older exports store the RoPE table per layer; the model computes its own.
    return hf_name.endswith("rotary_emb.inv_freq")


class HFReader(TensorReader):
    format = "hf"

    def __init__(self, directory: Path) -> None:
        self.path = directory
        config_path = directory / "config.json"
        self.config_file = str(config_path)
        self.args, _ = read_config(config_path, "hf")
        files = self._files_from_index(directory) if (directory / INDEX_NAME).exists() else sorted(directory.glob("*.safetensors"))
        self._files = [SafetensorsFile(p) for p in files]
        self._source: dict[str, tuple[SafetensorsFile, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in self._files:
            for hf_name, shape in f.shapes.items():
                if _ignored(hf_name):
                    continue
                name = hf_name_to_meta(hf_name)
                if name is None:
                    raise WeightsError(f"{f.path}: unexpected tensor {hf_name} (not part of a Llama model)")
                if name == "output.weight" and self.args.tie_word_embeddings:
                    continue  # tied: Hugging Face itself ignores a stored lm_head
                if name in self._source:
                    raise WeightsError(f"{f.path}: tensor {hf_name} is also in {self._source[name][0].path.name}")
                self._source[name] = (f, hf_name)
                self._shapes[name] = shape

    def _files_from_index(self, directory: Path) -> list[Path]:
        index = directory / INDEX_NAME
        try:
            weight_map = read_json(index)["weight_map"]
            names = sorted(set(weight_map.values()))
        except ConfigError as exc:
            raise WeightsError(str(exc)) from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise WeightsError(f"{index}: lists {missing[0]}, which is not in {directory}")
        self._index = index
        return [directory / n for n in names]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def where(self, name: str) -> str:
        if name in self._source:
            return str(self._source[name][0].path)
        return str(getattr(self, "_index", None) or (self._files[0].path if self._files else self.path))

    def display_name(self, name: str) -> str:
        try:
            return meta_name_to_hf(name)
        except (KeyError, ValueError):
            return name

    def _heads(self, name: str) -> int | None:
        if name.endswith("attention.wq.weight"):
            return self.args.n_heads
        if name.endswith("attention.wk.weight"):
            return self.args.n_kv_heads
        return None

    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        f, hf_name = self._source[name]
        src = f.tensor(hf_name)
        release = lambda t: release_pages(t, f.ranges)  # noqa: E731
        n_heads = self._heads(name)
        if n_heads is None:
            copy_into(dst, narrow(src, part), release)
            return
        # q/k: un-permute whole heads at a time (the permutation never crosses a head).
        head_rows = src.shape[0] // n_heads
        rows_from, rows_to = 0, src.shape[0]
        if part is not None and part.dim == 0:
            if part.start % head_rows or part.stop % head_rows:
                raise ValueError(f"{name}: part {part} does not cut at head boundaries ({head_rows} rows)")
            rows_from, rows_to = part.start, part.stop
        heads_per_step = max(1, CHUNK_BYTES // max(1, head_rows * src.shape[1] * src.element_size()))
        step = heads_per_step * head_rows
        for r in range(rows_from, rows_to, step):
            block = src[r : min(r + step, rows_to)]
            meta = hf_to_meta_rows(block, block.shape[0] // head_rows)
            if part is not None and part.dim == 1:
                meta = narrow(meta, part)
            dst[r - rows_from : r - rows_from + block.shape[0]].copy_(meta)
            release(block)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
