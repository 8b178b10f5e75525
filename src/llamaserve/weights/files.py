"""Opening checkpoint files safely: mmap, no code execution, errors that name the file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from llamaserve.config import ConfigError, ModelArgs, read_json
from llamaserve.config_hf import args_from_hf_config
from llamaserve.weights.errors import WeightsError
from llamaserve.weights.reader import file_mappings


class PthFile:
    """A `torch.save`d flat dict of tensors, memory-mapped; tensors are views of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # weights_only: the unpickler only builds tensors and plain containers, so a
            # checkpoint can never run code; mmap: nothing is read until a tensor is touched.
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: refused to load: the file holds objects other than tensors ({first})"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
            raise WeightsError(f"{path}: cannot read the file; it is truncated or not a PyTorch checkpoint ({_short(exc)})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise WeightsError(f"{path}: expected a flat dict of tensor name -> tensor, got {_describe(obj)}")
        self.tensors: dict[str, torch.Tensor] = obj
        self.ranges = file_mappings(path)


class SafetensorsFile:
    """A safetensors file opened with `safetensors.safe_open` (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
        except Exception as exc:  # SafetensorsError is not importable under one stable name
            raise WeightsError(
                f"{path}: cannot read the file; it is truncated or not a safetensors file ({_short(exc)})"
            ) from None
        self._ranges: list[tuple[int, int]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        try:
            t = self._handle.get_tensor(name)
        except Exception as exc:
            raise WeightsError(f"{self.path}: cannot read tensor {name} ({_short(exc)})") from None
        if self._ranges is None:
            # safetensors maps the file lazily: look up the mapping once it exists.
            self._ranges = file_mappings(self.path)
        return t

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges or []

    def close(self) -> None:
        self._handle = None


def read_config(path: Path, kind: str, overrides: dict[str, Any] | None = None) -> tuple[ModelArgs, dict[str, Any]]:
    """ModelArgs from `params.json` (kind "meta") or `config.json` (kind "hf"), plus the raw dict."""
    try:
        raw = read_json(path)
        if overrides:
            raw = {**raw, **overrides}
        args = ModelArgs.from_meta_params(raw, str(path)) if kind == "meta" else args_from_hf_config(raw, str(path))
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    return args, raw


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        return f"a dict whose entry {bad!r} is a {type(obj[bad]).__name__}"
    return f"a {type(obj).__name__}"
