"""int8 weight-only quantisation: symmetric, one fp32 scale per output channel (weight row).

Quantised: every linear layer (wq wk wv wo w1 w2 w3), the output head, and the token embedding
(one scale per vocabulary row; a lookup dequantises only the rows it reads). Norms stay in the
compute dtype. Activations are never quantised, so the error is the weights' rounding only.

A quantised tensor `X.weight` is stored as int8 `X.weight` plus fp32 `X.scale` [rows], in memory
and in the converted-weight cache alike: about a quarter of the fp32 bytes.

Speed on CPU (see benchmarks/README.md): the forward converts the int8 weight to the activation
dtype and calls F.linear, then scales the output columns. Measured against
`aten._weight_int8pack_mm` (8-50x slower than that on this CPU) and a per-call dequantise with the
scale folded into the weight (an extra full-size multiply).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.config import ModelArgs
from llamaserve.model.llama import Transformer, row_stable_mm
from llamaserve.model.parallel import SINGLE, TensorParallel

QUANT_MODES = ("int8",)
QMAX = 127
_LINEAR_SUFFIXES = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
)


def check_mode(quantize: str | None) -> str | None:
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be one of none, {', '.join(QUANT_MODES)}; got {quantize!r}")
    return quantize


def is_quantized_name(name: str) -> bool:
    return name.endswith(_LINEAR_SUFFIXES) or name in ("output.weight", "tok_embeddings.weight")


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "scale"


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [rows, cols], fp32 scale [rows]) with w ~= q * scale[:, None]."""
    w32 = w.float()
    scale = w32.abs().amax(dim=1) / QMAX
    # An all-zero row would divide by zero; any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w32 / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def quantize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every quantisable weight replaced by int8 weight + scale.

    Tensors are converted one at a time and the original dropped from the new dict, so the peak
    extra memory is one tensor's fp32 copy.
    """
    out = {}
    for name in list(sd):
        t = sd[name]
        if is_quantized_name(name):
            q, s = quantize_tensor(t)
            out[name], out[scale_name(name)] = q, s
        else:
            out[name] = t
    return out


def tie_output(sd: dict[str, torch.Tensor], args: ModelArgs, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Give a tied model's output head (this rank's vocab rows of) the embedding's storage."""
    if not args.tie_word_embeddings or "output.weight" in sd:
        return sd
    rows = args.vocab_size // tp.size
    out = dict(sd)
    for suffix in ("weight", "scale"):
        emb = sd.get(f"tok_embeddings.{suffix}")
        if emb is not None:
            out[f"output.{suffix}"] = emb.narrow(0, tp.rank * rows, rows) if tp.size > 1 else emb
    return out


class QuantLinear(nn.Module):
    """y = (x @ q.T) * scale, with q int8 [out, in] and scale fp32 [out]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is per output column, so it applies after the matmul: converting the int8
        # weight is the only per-call cost, and the matmul is the library's dense kernel, in
        # the row-stable form where it exists (batch invariance, as for plain weights).
        weight = self.weight.to(x.dtype)
        out = row_stable_mm(x, weight)
        out = F.linear(x, weight) if out is None else out.contiguous().view(*x.shape[:-1], -1)
        return out * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class QuantEmbedding(nn.Module):
    """Row lookup of an int8 table; only the looked-up rows are dequantised."""

    def __init__(self, num_embeddings: int, embedding_dim: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight[tokens].to(torch.float32) * self.scale[tokens].unsqueeze(-1)
        return rows.to(self.compute_dtype)


def _swap_modules(model: Transformer, compute_dtype: torch.dtype) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, QuantLinear(child.in_features, child.out_features))
    emb = model.tok_embeddings
    model.tok_embeddings = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, compute_dtype)


def build_quantized_model(
    args: ModelArgs, qsd: dict[str, torch.Tensor], tp: TensorParallel = SINGLE, compute_dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Transformer with QuantLinear / QuantEmbedding modules holding exactly the tensors of `qsd`."""
    from llamaserve.weights.loader import build_model

    return build_model(args, tie_output(qsd, args, tp), tp, swap_modules=lambda m: _swap_modules(m, compute_dtype))


def quantize_model(model: Transformer) -> Transformer:
    """Quantise an already-loaded model in place of a new one (its fp32 tensors are released)."""
    sd = model.state_dict()
    compute_dtype = model.norm.weight.dtype
    args, tp = model.args, model.tp
    del model
    return build_quantized_model(args, quantize_state_dict(sd), tp, compute_dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what the weights occupy in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("inv_freq")]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
