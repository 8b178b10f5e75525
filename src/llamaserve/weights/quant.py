"""Weight-only quantisation: int8 per output channel, or int4 in groups along the input.

int8: symmetric, one fp32 scale per output channel (weight row): `X.weight` int8 [rows, cols] +
`X.scale` fp32 [rows], about a quarter of the fp32 bytes.
int4: asymmetric, one fp16 scale and offset per group of INT4_GROUP inputs of a row
(w = q * scale + offset, q in 0..15): `X.weight` uint8 [rows, ceil(cols/2)] (two q per byte,
the even column in the low nibble) + `X.scale` and `X.offset` fp16 [rows, cols/group]: 4.5 bits
a weight at group 64. Scale and offset are fitted per group (range shrink search, then a least
squares refit), the way llama.cpp's K-quants fit theirs.
fp8: e4m3 with one fp32 scale per output channel, activations quantised per row on the fly
(weights/fp8.py: FP8 tensor cores on Hopper-class GPUs, emulated elsewhere).

Quantised: every linear layer (wq wk wv wo w1 w2 w3), the output head, and the token embedding
(a lookup dequantises only the rows it reads). Norms stay in the compute dtype. Activations are
rounded only as the matmuls multiply them: int4 layers take them as int8 per weight group
(kernels/qmatmul.py `rounded_inputs`, as llama.cpp's Q4 x Q8 dot products do), int8 layers in
fp32.

Speed on CPU: packed (QuantLinear.pack, at serving start) the layers run on kernels/qmatmul.cpp,
which reads the stored bytes and widens them in registers (benchmarks/README.md); without the
kernels, the weight is dequantised to the activation dtype for each call and fed to the dense
matmul (the torch fallback: the same results within rounding, much slower). On CUDA, int8 layers
with bf16/fp16 activations run on a fused Triton kernel instead (weights/int8_cuda.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.config import ModelArgs
from llamaserve.kernels import qmatmul
from llamaserve.model.cpu_linear import row_stable_mm
from llamaserve.model.llama import Transformer
from llamaserve.model.parallel import SINGLE, TensorParallel
from llamaserve.weights import int8_cuda
from llamaserve.weights.fp8 import FP8_DTYPE, FusedFp8, check_compute_dtype, fp8_linear, quantize_fp8

QUANT_MODES = ("int8", "int4", "fp8")
QMAX = 127
INT4_GROUP = 64
# Range shrink factors tried per int4 group (outliers cost the other 63 weights precision).
_INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_LINEAR_SUFFIXES = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
)


def check_mode(quantize: str | None, compute_dtype: torch.dtype | None = None) -> str | None:
    """The mode (None for none), or ValueError for an unknown one or one the compute dtype cannot take."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be one of none, {', '.join(QUANT_MODES)}; got {quantize!r}")
    if quantize == "fp8" and compute_dtype is not None:
        check_compute_dtype(compute_dtype)
    return quantize


def is_quantized_name(name: str) -> bool:
    return name.endswith(_LINEAR_SUFFIXES) or name in ("output.weight", "tok_embeddings.weight")


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "scale"


def offset_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "offset"


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


def int4_group(cols: int, requested: int = INT4_GROUP) -> int:
    """The group size for rows of `cols` inputs: the largest power of two up to `requested` that
    divides cols (the kernel reads two per byte, so even), or the whole row if cols is odd."""
    group = requested
    while group > 2 and cols % group:
        group //= 2
    return group if cols % group == 0 else cols


def _fit_int4(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """(q, scale, offset) of groups wg [..., g] for the range lo..hi (scale, offset fp16-exact)."""
    scale = ((hi - lo) / 15).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0 exactly
    offset = lo.half().float()
    q = torch.round((wg - offset[..., None]) / scale[..., None]).clamp_(0, 15)
    return q, scale, offset


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles uint8 [rows, ceil(cols/2)], scale fp16 [rows, cols/g], offset fp16 [rows, cols/g])."""
    rows, cols = w.shape
    g = int4_group(cols, group)
    wg = w.float().reshape(rows, cols // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best = None
    for shrink in _INT4_SHRINK:  # per group, keep the range with the least squared error
        best = _keep_better(best, wg, *_fit_int4(wg, lo * shrink, hi * shrink))
    # Least squares refit of scale and offset for the chosen q (w ~= scale * q + offset), kept
    # where it lowers the group's error.
    q = best[0]
    n = float(g)
    sq, sw, sqq, sqw = q.sum(-1), wg.sum(-1), q.square().sum(-1), (q * wg).sum(-1)
    det = n * sqq - sq * sq
    fit = det > 0
    det = torch.where(fit, det, torch.ones_like(det))
    scale = ((n * sqw - sq * sw) / det).half().float()
    offset = ((sw - scale * sq) / n).half().float()
    fit &= scale > 0
    best = _keep_better(best, wg, q, torch.where(fit, scale, best[1]), torch.where(fit, offset, best[2]))
    q, scale, offset = best[:3]
    q = q.to(torch.uint8).reshape(rows, cols)
    if cols % 2:
        q = torch.cat([q, q.new_zeros(rows, 1)], dim=1)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale.half(), offset.half()


def _keep_better(best, wg, q, scale, offset):
    """(q, scale, offset, error) per group: the candidate's where its squared error is lower."""
    err = (q * scale[..., None] + offset[..., None] - wg).square().sum(-1)
    if best is None:
        return q, scale, offset, err
    better = err < best[3]
    return (torch.where(better[..., None], q, best[0]), torch.where(better, scale, best[1]),
            torch.where(better, offset, best[2]), torch.where(better, err, best[3]))


def unpack_int4(nibbles: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/2)] -> q as uint8 [rows, cols]."""
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1)
    return q[:, :cols]


def dequantize_int4(nibbles: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, cols: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, groups = scale.shape
    q = unpack_int4(nibbles, cols).float().view(rows, groups, cols // groups)
    return (q * scale.float()[..., None] + offset.float()[..., None]).view(rows, cols).to(dtype)


def quantize_state_dict(sd: dict[str, torch.Tensor], mode: str = "int8") -> dict[str, torch.Tensor]:
    """A new state dict with every quantisable weight replaced by its quantised tensors.

    Tensors are converted one at a time and the original dropped from the new dict, so the peak
    extra memory is one tensor's fp32 copy.
    """
    out = {}
    for name in list(sd):
        t = sd[name]
        if not is_quantized_name(name):
            out[name] = t
        elif mode == "int4":
            out[name], out[scale_name(name)], out[offset_name(name)] = quantize_int4(t)
        elif mode == "fp8":
            out[name], out[scale_name(name)] = quantize_fp8(t)
        else:
            out[name], out[scale_name(name)] = quantize_tensor(t)
    return out


def tie_output(sd: dict[str, torch.Tensor], args: ModelArgs, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Give a tied model's output head (this rank's vocab rows of) the embedding's storage."""
    if not args.tie_word_embeddings or "output.weight" in sd:
        return sd
    rows = args.vocab_size // tp.size
    out = dict(sd)
    for suffix in ("weight", "scale", "offset"):
        emb = sd.get(f"tok_embeddings.{suffix}")
        if emb is not None:
            out[f"output.{suffix}"] = emb.narrow(0, tp.rank * rows, rows) if tp.size > 1 else emb
    return out


class _QuantWeights(nn.Module):
    """The stored tensors of one quantised weight [out_features, in_features] (buffers named as
    in the state dict), and its dequantisation."""

    def __init__(self, in_features: int, out_features: int, mode: str = "int8", groups: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        if mode == "int4":
            groups = groups or in_features // int4_group(in_features)
            self.register_buffer("weight", torch.empty(out_features, (in_features + 1) // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
            self.register_buffer("offset", torch.empty(out_features, groups, dtype=torch.float16))
        else:
            dtype = FP8_DTYPE if mode == "fp8" else torch.int8
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))
            self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "int4":
            return dequantize_int4(self.weight, self.scale, self.offset, self.in_features, dtype)
        return self.weight.to(dtype)  # int8, fp8: the scale applies to the output columns

    def packed_for_kernel(self) -> qmatmul.PackedWeight:
        if self.mode == "int4":
            return qmatmul.pack_int4(self.weight, self.scale, self.offset, self.in_features)
        return qmatmul.pack_int8(self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


def kernel_applies(weight: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether a quantised layer can run on the qmatmul kernel: int8 or int4, CPU, fp32
    activations, built here."""
    return (weight.device.type == "cpu" and not weight.is_meta and weight.dtype != FP8_DTYPE
            and compute_dtype == torch.float32 and qmatmul.available())


class QuantLinear(_QuantWeights):
    """y = x @ w.T for a quantised w: on the qmatmul kernel once packed, else by dequantising."""

    packed_weight: qmatmul.PackedWeight | None = None
    compute_dtype = torch.float32  # the activations' dtype (_swap_modules sets the model's)

    def pack(self) -> bool:
        """Repack for the kernel, dropping the plain buffers (as Linear.pack drops its weight)."""
        if self.packed_weight is None and kernel_applies(self.weight, self.compute_dtype):
            self.packed_weight = self.packed_for_kernel()
            _to_meta(self)
        return self.packed_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return qmatmul.matmul(x, self.packed_weight).to(x.dtype)
        if self.mode == "fp8":
            return fp8_linear(x, self.weight, self.scale)
        if self.mode == "int8" and int8_cuda.applies(x, self.weight):
            out = int8_cuda.matmul(x, self.weight, self.scale)
            if out is not None:
                return out
        if self.mode == "int4":  # what the kernel multiplies (int8 activations per weight group)
            x = qmatmul.rounded_inputs(x, "int4", self.in_features // self.scale.shape[1])
        weight = self.dequantized(x.dtype)
        out = row_stable_mm(x, weight)
        out = F.linear(x, weight) if out is None else out.contiguous().view(*x.shape[:-1], -1)
        return out * self.scale.to(x.dtype) if self.mode == "int8" else out

    @staticmethod
    def fuse(layers: list[QuantLinear]) -> qmatmul.Fused | FusedFp8 | None:
        """The layers as one packed matmul (cpu_linear.fuse_projections), or None where that does not apply."""
        if all(isinstance(layer, QuantLinear) and layer.mode == "fp8" and not layer.weight.is_meta for layer in layers):
            fused = FusedFp8([layer.weight for layer in layers], [layer.scale for layer in layers])
            for layer in layers:
                _to_meta(layer)
            return fused
        return fuse_quantized(layers) if _fusable(layers) else None


def _to_meta(module: nn.Module) -> None:
    for name, buf in list(module.named_buffers(recurse=False)):
        setattr(module, name, torch.empty_like(buf, device="meta"))


def fuse_quantized(layers: list[QuantLinear]) -> qmatmul.Fused:
    """Same-input QuantLinear layers (q/k/v; w1/w3) as one packed kernel matmul; their plain
    buffers are dropped."""
    first = layers[0]
    joined = _QuantWeights(first.in_features, sum(layer.out_features for layer in layers), first.mode, _groups(first))
    for name, _ in list(joined.named_buffers()):
        setattr(joined, name, torch.cat([getattr(layer, name) for layer in layers]))
    fused = qmatmul.Fused(joined.packed_for_kernel(), [layer.out_features for layer in layers])
    for layer in layers:
        _to_meta(layer)
    return fused


def _fusable(layers: list) -> bool:
    return (all(isinstance(layer, QuantLinear) and layer.packed_weight is None for layer in layers)
            and len({(layer.mode, _groups(layer), layer.compute_dtype) for layer in layers}) == 1
            and kernel_applies(layers[0].weight, layers[0].compute_dtype))


def _groups(layer: _QuantWeights) -> int | None:
    return layer.scale.shape[1] if layer.mode == "int4" else None


class QuantEmbedding(_QuantWeights):
    """Row lookup of a quantised table; only the looked-up rows are dequantised."""

    def __init__(self, num_embeddings: int, embedding_dim: int, compute_dtype: torch.dtype, mode: str = "int8",
                 groups: int | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, mode, groups)
        self.compute_dtype = compute_dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if self.mode == "int4":
            rows = dequantize_int4(self.weight[flat], self.scale[flat], self.offset[flat], self.in_features)
        else:
            rows = self.weight[flat].to(torch.float32) * self.scale[flat].unsqueeze(-1)
        return rows.to(self.compute_dtype).view(*tokens.shape, -1)


def stored_mode(qsd: dict[str, torch.Tensor]) -> str:
    """The quantisation mode of a quantised state dict, from its tensors."""
    if any(name.endswith(".offset") for name in qsd):
        return "int4"
    return "fp8" if qsd["tok_embeddings.weight"].dtype == FP8_DTYPE else "int8"


def _swap_modules(model: Transformer, compute_dtype: torch.dtype, qsd: dict[str, torch.Tensor]) -> None:
    mode = stored_mode(qsd)
    if mode == "fp8":
        check_compute_dtype(compute_dtype)

    def groups(prefix: str) -> int | None:
        scale = qsd.get(prefix + ".scale")
        return scale.shape[1] if mode == "int4" and scale is not None else None

    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{module_name}.{child_name}" if module_name else child_name
                layer = QuantLinear(child.in_features, child.out_features, mode, groups(full))
                layer.compute_dtype = compute_dtype
                setattr(module, child_name, layer)
    emb = model.tok_embeddings
    model.tok_embeddings = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, compute_dtype, mode,
                                          groups("tok_embeddings"))


def build_quantized_model(
    args: ModelArgs, qsd: dict[str, torch.Tensor], tp: TensorParallel = SINGLE, compute_dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Transformer with QuantLinear / QuantEmbedding modules holding exactly the tensors of `qsd`."""
    from llamaserve.weights.loader import build_model

    tied = tie_output(qsd, args, tp)
    return build_model(args, tied, tp, swap_modules=lambda m: _swap_modules(m, compute_dtype, tied))


def quantize_model(model: Transformer, mode: str = "int8") -> Transformer:
    """Quantise an already-loaded model in place of a new one (its fp32 tensors are released)."""
    sd = model.state_dict()
    compute_dtype = model.norm.weight.dtype
    args, tp = model.args, model.tp
    del model
    return build_quantized_model(args, quantize_state_dict(sd, mode), tp, compute_dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what the weights occupy in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("inv_freq")]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
