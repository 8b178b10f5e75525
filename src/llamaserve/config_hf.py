"""Hugging Face `config.json` in every dialect `transformers` 4.x and 5.x write, to ModelArgs.

Dialects: `rope_theta` top-level (4.x) or inside `rope_parameters` (5.x); RoPE scaling as
`rope_scaling` (4.x, with `type` or `rope_type`) or `rope_parameters` (5.x); `head_dim` explicit
or implied; Mistral's config class (same computation without a sliding window).

Rules, so that we never compute a different model than `transformers` would:
- a field that is absent takes the value `transformers` itself uses (DEFAULTS, pinned by a test
  against `LlamaConfig()` / `MistralConfig()`);
- a field that is present but changes the computation in a way we do not implement is an error
  naming the field, never ignored;
- every value is type- and range-checked, and each problem is one line naming the field.
"""

from __future__ import annotations

from typing import Any

from llamaserve.config import INT_LIMITS, ConfigError, ModelArgs, check_float, check_int

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

# transformers' own defaults for absent fields (LlamaConfig / MistralConfig in 4.x and 5.x).
_COMMON = {
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "head_dim": None,  # hidden_size // num_attention_heads
}
DEFAULTS = {
    "llama": {**_COMMON, "intermediate_size": 11008, "num_key_value_heads": None,  # = num_attention_heads
              "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "mistral": {**_COMMON, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
# What an int field of config.json becomes, and its upper bound.
_INT_FIELDS = {
    "hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size", "intermediate_size": "explicit_hidden_dim",
    "head_dim": "explicit_head_dim", "max_position_embeddings": "max_positions",
}
# hidden_act values that are SiLU in transformers' ACT2FN.
_SILU = ("silu", "swish")
# Fields that would change the computation and have only one value we implement.
_MUST_BE = {"attention_bias": False, "mlp_bias": False}


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _model_type(cfg: dict[str, Any], source: str) -> str:
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise _fail(source, f"architectures must be a list of names, got {archs!r:.80}")
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise _fail(source, f"architectures {unknown[0]!r} is not supported "
                                f"(only {', '.join(ARCHITECTURES)})")
    model_type = cfg.get("model_type")
    if model_type is None:
        kinds = {ARCHITECTURES[a] for a in archs or ()}
        return kinds.pop() if len(kinds) == 1 else "llama"
    if model_type not in DEFAULTS:
        raise _fail(source, f"model_type {model_type!r:.60} is not supported (only {', '.join(DEFAULTS)})")
    return model_type


def _get(cfg: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
    # transformers treats an explicit null like an absent field for these.
    value = cfg.get(key)
    return defaults.get(key) if value is None else value


def _rope(cfg: dict[str, Any], source: str, max_positions: int) -> dict[str, Any]:
    """RoPE settings as transformers 5 standardises them: `rope_scaling` (4.x) replaces
    `rope_parameters`; rope_theta inside the dict wins over the top-level one; the type is
    `rope_type`, else `type`, else "default"."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise _fail(source, f"{key} must be an object, got {params!r:.60}")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    theta_field = f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"
    if theta is None:
        theta = DEFAULTS["llama"]["rope_theta"]
    problem = check_float(theta_field, theta)
    if problem:
        raise _fail(source, problem)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _fail(source, f"partial_rotary_factor {partial!r:.40} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise _fail(source, f"{key}.rope_type {rope_type!r:.40} is not supported (only 'default' and 'llama3')")
    # transformers reads these four without defaults (a KeyError there), except the original
    # context, which falls back to a top-level field, then max_position_embeddings.
    original = cfg.get("original_max_position_embeddings", params.get("original_max_position_embeddings", max_positions))
    values = {"factor": params.get("factor"), "low_freq_factor": params.get("low_freq_factor"),
              "high_freq_factor": params.get("high_freq_factor")}
    for name, value in values.items():
        if value is None:
            raise _fail(source, f"{key}.{name} is required for rope_type 'llama3'")
        problem = check_float(f"{key}.{name}", value)
        if problem:
            raise _fail(source, problem)
    problem = check_int(f"{key}.original_max_position_embeddings", original, INT_LIMITS["rope_original_max_positions"])
    if problem:
        raise _fail(source, problem)
    out.update(use_scaled_rope=True, rope_scale_factor=float(values["factor"]),
               rope_low_freq_factor=float(values["low_freq_factor"]),
               rope_high_freq_factor=float(values["high_freq_factor"]), rope_original_max_positions=original)
    return out


def _check_unsupported(cfg: dict[str, Any], source: str, model_type: str, defaults: dict[str, Any]) -> None:
    act = _get(cfg, "hidden_act", defaults)
    if act not in _SILU:
        raise _fail(source, f"hidden_act {act!r:.40} is not supported (only 'silu')")
    for field, wanted in _MUST_BE.items():
        value = cfg.get(field, wanted)
        if not isinstance(value, bool):
            raise _fail(source, f"{field} must be true or false, got {value!r:.40}")
        if value != wanted:
            raise _fail(source, f"{field}: {str(value).lower()} is not supported (Llama has no biases)")
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method") if isinstance(cfg["quantization_config"], dict) else None
        raise _fail(source, f"quantization_config ({method or 'unknown'} pre-quantized weights) is not supported; "
                            f"use unquantized weights (llamaserve quantizes with --quantize)")
    if model_type == "mistral" or "sliding_window" in cfg:
        # null is meaningful here: no window (Mistral v0.2 and later)
        window = cfg["sliding_window"] if "sliding_window" in cfg else defaults.get("sliding_window")
        limit = _get(cfg, "max_position_embeddings", defaults)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < limit):
            shown = f"{window!r:.40}" + ("" if "sliding_window" in cfg else " (transformers' default when absent)")
            raise _fail(source, f"sliding_window {shown} is not supported: sliding-window attention is not "
                                f"implemented (null, or at least max_position_embeddings {limit}, is)")


def args_from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
    if not isinstance(cfg, dict):
        raise _fail(source, f"expected a JSON object, got {type(cfg).__name__}")
    model_type = _model_type(cfg, source)
    defaults = DEFAULTS[model_type]
    ints: dict[str, int | None] = {}
    for field, name in _INT_FIELDS.items():
        value = _get(cfg, field, defaults)
        if value is None:  # head_dim, num_key_value_heads: derived below
            ints[field] = None
            continue
        problem = check_int(field, value, INT_LIMITS[name])
        if problem:
            raise _fail(source, problem)
        ints[field] = value
    eps = _get(cfg, "rms_norm_eps", defaults)
    problem = check_float("rms_norm_eps", eps, below=1.0)
    if problem:
        raise _fail(source, problem)
    tied = _get(cfg, "tie_word_embeddings", defaults)
    if not isinstance(tied, bool):
        raise _fail(source, f"tie_word_embeddings must be true or false, got {tied!r:.40}")
    _check_unsupported(cfg, source, model_type, defaults)
    rope = _rope(cfg, source, ints["max_position_embeddings"])
    heads, head_dim = ints["num_attention_heads"], ints["head_dim"]
    if head_dim is not None and head_dim * heads == ints["hidden_size"]:
        head_dim = None  # the implied width: keep the args identical to a Meta checkpoint's
    try:
        return ModelArgs(
            dim=ints["hidden_size"], n_layers=ints["num_hidden_layers"], n_heads=heads,
            n_kv_heads=ints["num_key_value_heads"] or heads, vocab_size=ints["vocab_size"],
            explicit_hidden_dim=ints["intermediate_size"], explicit_head_dim=head_dim, norm_eps=float(eps),
            tie_word_embeddings=tied, max_positions=ints["max_position_embeddings"], **rope,
        )
    except ConfigError as exc:
        raise _fail(source, str(exc)) from None
