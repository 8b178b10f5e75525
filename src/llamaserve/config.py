"""Model hyper-parameters, read from Meta's `params.json` or Hugging Face's `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA3_VOCAB_SIZE = 128256


class ConfigError(ValueError):
    """A model configuration file is missing, unreadable or inconsistent."""


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

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
            if (self.dim // self.n_heads) % 2:
                problems.append(f"head_dim {self.dim // self.n_heads} must be even for RoPE")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if required not in cfg:
                raise ConfigError(f"{source}: missing required field '{required}'")
        if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
            raise ConfigError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
        scaling = cfg.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default", "llama3"):
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (only 'llama3')")
        extra: dict[str, Any] = {}
        if rope_type == "llama3":
            extra = dict(
                use_scaled_rope=True,
                rope_scale_factor=float(scaling.get("factor", 8.0)),
                rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                rope_original_max_positions=int(scaling.get("original_max_position_embeddings", 8192)),
            )
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            explicit_hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            **extra,
        )

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
            "max_position_embeddings": 8192,
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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
