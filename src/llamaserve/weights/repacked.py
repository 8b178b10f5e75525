"""Repacked layer chunks: `layers_{a}-{b}.pth` (or `.safetensors`) plus `params.json`.

Each chunk holds the merged (unsharded) Meta-layout tensors of layers a..b inclusive; the
non-layer weights (`tok_embeddings`, `norm`, `output`) live in the first chunk (SPEC section 4).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llamaserve.weights.errors import WeightsError
from llamaserve.weights.files import PthFile, SafetensorsFile, read_config
from llamaserve.weights.reader import Part, TensorReader, copy_into, narrow, release_pages

CHUNK_RE = re.compile(r"layers_(\d+)-(\d+)\.(pth|safetensors)")
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def chunk_files(directory: Path) -> list[Path]:
    found = [p for p in directory.iterdir() if CHUNK_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHUNK_RE.fullmatch(p.name).group(1)))


class RepackedReader(TensorReader):
    format = "repacked"

    def __init__(self, directory: Path) -> None:
        self.path = directory
        params_path = directory / "params.json"
        self.config_file = str(params_path)
        self.args, _ = read_config(params_path, "meta")
        files = chunk_files(directory)
        self._check_ranges(files)
        self._files: list[PthFile | SafetensorsFile] = []
        self._where: dict[str, PthFile | SafetensorsFile] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for i, path in enumerate(files):
            f = PthFile(path) if path.suffix == ".pth" else SafetensorsFile(path)
            self._files.append(f)
            first, last = (int(g) for g in CHUNK_RE.fullmatch(path.name).groups()[:2])
            shapes = {k: tuple(v.shape) for k, v in f.tensors.items()} if isinstance(f, PthFile) else f.shapes
            for name, shape in shapes.items():
                m = _LAYER_RE.match(name)
                if m and not first <= int(m.group(1)) <= last:
                    raise WeightsError(f"{path}: unexpected tensor {name}: this chunk holds layers {first}-{last}")
                if not m and i > 0:
                    raise WeightsError(
                        f"{path}: unexpected tensor {name}: non-layer weights belong in the first chunk {files[0].name}"
                    )
                self._where[name] = f
                self._shapes[name] = shape
        if "output.weight" not in self._shapes:
            self.args = self.args.replace(tie_word_embeddings=True)

    def _check_ranges(self, files: list[Path]) -> None:
        expected_start = 0
        for path in files:
            first, last = (int(g) for g in CHUNK_RE.fullmatch(path.name).groups()[:2])
            if last < first:
                raise WeightsError(f"{path}: chunk name says layers {first}-{last}, an empty range")
            if first != expected_start:
                what = "overlaps the previous chunk" if first < expected_start else f"leaves layers {expected_start}-{first - 1} in no chunk"
                raise WeightsError(f"{path}: chunk starts at layer {first} and {what}")
            expected_start = last + 1
        if expected_start != self.args.n_layers:
            raise WeightsError(
                f"{files[-1]}: the chunks hold layers 0-{expected_start - 1} but {self.config_file} "
                f"says n_layers={self.args.n_layers}"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def where(self, name: str) -> str:
        if name in self._where:
            return str(self._where[name].path)
        m = _LAYER_RE.match(name)
        layer = int(m.group(1)) if m else 0
        for f in self._files:
            first, last = (int(g) for g in CHUNK_RE.fullmatch(f.path.name).groups()[:2])
            if first <= layer <= last:
                return str(f.path)
        return str(self._files[0].path)

    def _fill(self, name: str, dst: torch.Tensor, part: Part | None) -> None:
        f = self._where[name]
        src = f.tensors[name] if isinstance(f, PthFile) else f.tensor(name)
        copy_into(dst, narrow(src, part), lambda t: release_pages(t, f.ranges))

    def close(self) -> None:
        for f in self._files:
            if isinstance(f, SafetensorsFile):
                f.close()
        self._files = []
