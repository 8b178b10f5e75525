"""Checkpoint loading: Meta shards, repacked layer chunks, Hugging Face safetensors, built-in."""

from llamaserve.weights.errors import WeightsError
from llamaserve.weights.loader import (
    LoadedModel,
    build_model,
    detect_format,
    load_model,
    open_checkpoint,
    read_state_dict,
    tp_part,
)
from llamaserve.weights.reader import Part, StateDictReader, TensorReader

__all__ = [
    "LoadedModel",
    "Part",
    "StateDictReader",
    "TensorReader",
    "WeightsError",
    "build_model",
    "detect_format",
    "load_model",
    "open_checkpoint",
    "read_state_dict",
    "tp_part",
]
