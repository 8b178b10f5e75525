"""Tensor names and layouts: Meta's (what the model uses) and Hugging Face's."""

from __future__ import annotations

import re

import torch

from llamaserve.config import ModelArgs

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META_TO_HF_LAYER = {v: k for k, v in _HF_TO_META_LAYER.items()}
_HF_TO_META_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_META_TO_HF_GLOBAL = {v: k for k, v in _HF_TO_META_GLOBAL.items()}

LAYER_KEYS = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a full (unsharded) Meta-layout checkpoint holds, with its shape."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    per_layer = {
        "attention.wq.weight": (args.n_heads * hd, d),
        "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d),
        "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (hidden, d),
        "feed_forward.w2.weight": (d, hidden),
        "feed_forward.w3.weight": (hidden, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        for key, shape in per_layer.items():
            shapes[f"layers.{i}.{key}"] = shape
    return shapes


def hf_name_to_meta(name: str) -> str | None:
    if name in _HF_TO_META_GLOBAL:
        return _HF_TO_META_GLOBAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _HF_TO_META_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}"
    return None


def meta_name_to_hf(name: str) -> str:
    if name in _META_TO_HF_GLOBAL:
        return _META_TO_HF_GLOBAL[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_META_TO_HF_LAYER[rest]}"


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row permutation (half-split RoPE back to interleaved pairs)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    # [heads, 2, hd/2, cols] -> [heads, hd/2, 2, cols]
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    head_dim = rows // n_heads
    # [heads, hd/2, 2, cols] -> [heads, 2, hd/2, cols]
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_rows(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_rows(t, args.n_kv_heads)
        out[meta_name_to_hf(name)] = t.contiguous()
    return out
