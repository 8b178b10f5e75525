"""Reading a llama.cpp GGUF file: its metadata, its tensors' names and types, and the
Hugging Face `config.json` its `llama.*` keys describe.

The file is opened with the `gguf` package's reader (a numpy memory map: nothing is read until a
tensor is touched). Only the `llama` architecture is served, and only tensor types whose
dequantizer the `gguf` package ships and that llama.cpp's Llama quantisations use; anything else
is refused with one line naming the file and what it holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llamaserve.weights.errors import WeightsError

# The tensor types llama.cpp's Llama files are made of (every `--outtype` and the Q*_K_S/M/L
# mixes): the `gguf` package dequantizes each of them.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
# Llama 3.1+ files store their scaled-RoPE factors as a tensor; it becomes config, not a weight.
ROPE_FREQS = "rope_freqs.weight"


def meta_name(gguf_name: str) -> str | None:
    """The Meta-layout name of a llama.cpp tensor name (None: not a Llama weight)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> Python value) and `tensors` (name -> ReaderTensor)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path), "r")
        except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
            raise WeightsError(f"{path}: cannot read the file; it is truncated or not a GGUF file ({_short(exc)})") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        self._fields = self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise WeightsError(f"{self.path}: metadata key {key} is missing")
        return value

    def check_supported(self) -> None:
        arch = self.get("general.architecture")
        if arch != "llama":
            raise WeightsError(f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        for t in self.tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise WeightsError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which is not supported "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})"
                )

    def torch_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def hf_config(self) -> dict[str, Any]:
        """config.json (transformers' Llama dialect) for this file's `llama.*` metadata."""
        g = self.get
        hidden, heads = int(self.require("llama.embedding_length")), int(self.require("llama.attention.head_count"))
        head_dim = int(g("llama.attention.key_length") or hidden // heads)
        rot = g("llama.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise WeightsError(f"{self.path}: llama.rope.dimension_count {rot} != head dim {head_dim} "
                               "(partial rotary embeddings are not supported)")
        if g("llama.attention.value_length") not in (None, head_dim):
            raise WeightsError(f"{self.path}: llama.attention.value_length {g('llama.attention.value_length')} "
                               f"!= key_length {head_dim} is not supported")
        scaling = g("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            raise WeightsError(f"{self.path}: llama.rope.scaling.type {scaling!r} is not supported")
        if "token_embd.weight" not in self.tensors:
            raise WeightsError(f"{self.path}: missing tensor token_embd.weight")
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": int(self.require("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(g("llama.attention.head_count_kv") or heads),
            "intermediate_size": int(self.require("llama.feed_forward_length")),
            "vocab_size": self.torch_shape("token_embd.weight")[0],
            "rms_norm_eps": float(self.require("llama.attention.layer_norm_rms_epsilon")),
            # llama.cpp's default RoPE base for a Llama file that does not state one.
            "rope_theta": float(g("llama.rope.freq_base") or 10000.0),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if head_dim != hidden // heads:
            cfg["head_dim"] = head_dim
        if g("llama.context_length") is not None:
            cfg["max_position_embeddings"] = int(g("llama.context_length"))
        if ROPE_FREQS in self.tensors:
            cfg["rope_scaling"] = self._llama3_rope_scaling(cfg["rope_theta"], head_dim)
        return cfg

    def _llama3_rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any]:
        """The llama3 `rope_scaling` whose per-frequency factors are the file's rope_freqs tensor
        (llama.cpp's converter computes them from it; the parameters themselves are not stored)."""
        from gguf.quants import dequantize

        t = self.tensors[ROPE_FREQS]
        factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        original = int(self.get("llama.rope.scaling.original_context_length") or 8192)
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": original}
        want = llama3_rope_factors(theta, head_dim, scaling)
        if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-4, atol=1e-6):
            raise WeightsError(
                f"{self.path}: tensor {ROPE_FREQS} is not Llama 3's scaled RoPE (factor {scaling['factor']:g}, "
                f"low/high frequency factors 1/4, original context {original}); other RoPE scalings are not supported"
            )
        return scaling

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            mm = getattr(reader.data, "_mmap", None)
            self._reader = None
            self.tensors = {}
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):  # still referenced by a tensor view: left to gc
                    pass


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.cpp stores as rope_freqs for a Llama 3.1-style `rope_scaling` (wavelength
    divisors per frequency: 1 for high frequencies, `factor` for low, smooth in between)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float64)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
