"""Model hyper-parameters (ModelArgs), their checks, Meta's `params.json`, and bounded reading of config files
(Hugging Face's `config.json` dialects: `config_hf.py`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA3_VOCAB_SIZE = 128256


class ConfigError(ValueError):
    """A model configuration file is missing, unreadable or inconsistent."""


# Sane upper bounds, checked before anything is sized from a config (a 1e9-layer config must be
# refused, not allocated). Each is far above any released Llama-architecture model.
INT_LIMITS = {
    "dim": 1 << 17, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "vocab_size": 1 << 22,
    "multiple_of": 1 << 20, "explicit_hidden_dim": 1 << 20, "explicit_head_dim": 1024,
    "rope_original_max_positions": 1 << 24, "max_positions": 1 << 24,
}
FLOAT_FIELDS = ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor",
                "rope_high_freq_factor")
BOOL_FIELDS = ("use_scaled_rope", "tie_word_embeddings")


def check_int(name: str, value: Any, limit: int, low: int = 1) -> str | None:
    """None if value is an int in [low, limit], else what is wrong (one line)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer, got {value!r:.40} ({type(value).__name__})"
    if not low <= value <= limit:
        return f"{name} must be between {low} and {limit}, got {value}"
    return None


def check_float(name: str, value: Any, positive: bool = True, below: float | None = None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r:.40} ({type(value).__name__})"
    if not math.isfinite(value) or (positive and value <= 0) or (below is not None and value >= below):
        bound = f" and below {below}" if below is not None else ""
        return f"{name} must be a finite number{' above 0' if positive else ''}{bound}, got {value}"
    return None


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = LLAMA3_VOCAB_SIZE
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # Hugging Face configs state the FFN width directly; Meta's derive it from the two fields above.
    explicit_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    tie_word_embeddings: bool = False
    # Some Llama-architecture models state a head width other than dim / n_heads.
    explicit_head_dim: int | None = None
    # The context the model was trained for (config.json's max_position_embeddings), if known.
    max_positions: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        problems = self._field_problems()
        if not problems:
            if self.explicit_head_dim is None and self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
            if self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
            if self.use_scaled_rope and self.rope_high_freq_factor <= self.rope_low_freq_factor:
                problems.append(f"rope high_freq_factor {self.rope_high_freq_factor} must be above "
                                f"low_freq_factor {self.rope_low_freq_factor}")
            if self.hidden_dim > INT_LIMITS["explicit_hidden_dim"]:
                problems.append(f"FFN width {self.hidden_dim} is above {INT_LIMITS['explicit_hidden_dim']}")
        if problems:
            raise ConfigError("; ".join(problems))

    def _field_problems(self) -> list[str]:
        """Types and ranges of every field (D9: a bad value is one line, never a traceback)."""
        problems = []
        for name, limit in INT_LIMITS.items():
            value = getattr(self, name)
            if value is not None or name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
                problems.append(check_int(name, value, limit, low=2 if name == "explicit_head_dim" else 1))
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                problems.append(check_float(name, value, below=1.0 if name == "norm_eps" else None))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r:.40}")
        return [p for p in problems if p]

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim if self.explicit_head_dim is not None else self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.explicit_hidden_dim is not None:
            return self.explicit_hidden_dim
        # Meta's rule (llama/model.py FeedForward): 2/3 of 4*dim, scaled, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def is_llama3_vocab(self) -> bool:
        return self.vocab_size >= LLAMA3_VOCAB_SIZE

    def num_parameters(self) -> int:
        d, h, kv = self.dim, self.n_heads, self.n_kv_heads
        hd = self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        ffn = 3 * d * self.hidden_dim
        per_layer = attn + ffn + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    # ---- serialisation -------------------------------------------------------------------

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], source: str = "params.json") -> "ModelArgs":
        known = {
            "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
            "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope",
        }
        kwargs = {k: v for k, v in params.items() if k in known}
        for required in ("dim", "n_layers", "n_heads"):
            if required not in kwargs:
                raise ConfigError(f"{source}: missing required field '{required}'")
        if kwargs.get("vocab_size") not in (-1, None):
            problem = check_int("vocab_size", kwargs["vocab_size"], INT_LIMITS["vocab_size"])
            if problem:
                raise ConfigError(f"{source}: {problem}")
        if kwargs.get("vocab_size", -1) in (-1, None):
            # Llama 2 params.json ships vocab_size -1: the tokenizer decides; the tensors confirm.
            kwargs.pop("vocab_size", None)
            kwargs["vocab_size"] = 32000
            kwargs.setdefault("rope_theta", 10000.0)
        # Llama 2 params.json has no rope_theta: its RoPE base was 10000.
        if "rope_theta" not in kwargs:
            kwargs["rope_theta"] = 10000.0 if kwargs["vocab_size"] < LLAMA3_VOCAB_SIZE else 500000.0
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_meta_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.use_scaled_rope,
        }
        if self.explicit_head_dim is not None and self.explicit_head_dim * self.n_heads != self.dim:
            raise ConfigError(f"head_dim {self.explicit_head_dim} != dim / n_heads cannot be expressed in params.json")
        if self.explicit_hidden_dim is not None and self.explicit_hidden_dim != self.replace(explicit_hidden_dim=None).hidden_dim:
            raise ConfigError(
                f"FFN width {self.explicit_hidden_dim} cannot be expressed with multiple_of/ffn_dim_multiplier"
            )
        return out

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_positions or 8192,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.use_scaled_rope:
            cfg["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scale_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_positions,
            }
        return cfg

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# Config files are small; a bigger one is a mistake or an attack, refused before reading it.
MAX_CONFIG_BYTES = 16 << 20


def read_regular_file(path: Path, max_bytes: int = MAX_CONFIG_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most max_bytes, read with a bound.

    A FIFO, device (/dev/zero) or directory is refused without reading it: opening a FIFO would
    block forever and a device never ends. O_NONBLOCK makes even a FIFO swapped in after the stat
    open without waiting; fstat on the open file decides.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file (a {_file_kind(st.st_mode)}); a {what} must be a plain file")
        if st.st_size > max_bytes:
            raise ConfigError(f"{path}: {st.st_size} bytes is too large for a {what} (limit {max_bytes} bytes)")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # the file grew while being read
            raise ConfigError(f"{path}: more than {max_bytes} bytes is too large for a {what}")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object from a bounded read of a regular file; every failure is one ConfigError line."""
    data = read_regular_file(path, max_bytes, what="JSON config")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (RecursionError, ValueError) as exc:  # 100k-deep nesting, 5000-digit integers
        raise ConfigError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# The built-in model: Llama-3-shaped, small enough to run anywhere, random by construction.
BUILTIN_MODEL_ARGS = ModelArgs(
    dim=256,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=LLAMA3_VOCAB_SIZE,
    multiple_of=256,
    rope_theta=500000.0,
)
BUILTIN_SEED = 1234
