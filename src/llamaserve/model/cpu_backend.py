"""The CPU serving backend of the Llama transformer (model/llama.py): weight packing, fused
projections and the compiled kernels that run every token as one row.

`prepare_for_serving(model)` is what the runner calls (through `Transformer.prepare_for_serving`):
it packs every linear layer (oneDNN's layout for fp32, the qmatmul kernel for bf16 and
quantised weights; same-input layers fused into one matmul), builds the decode kernels, and
returns the decisions the runner and scheduler need as a `ServingPlan`. The model's forward asks
`model.decode_kernels_fit()` and, where the kernels fit, hands its layers to `layers_as_rows`.

The functions take the model and ask it for the decisions it can be told to skip (tests turn
the kernels off per model: `model.decode_kernels_fit = lambda: False`, as LLAMASERVE_KERNELS=0
does for every model), so such a model is served on the torch path throughout.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from llamaserve import kernels
from llamaserve.kernels import decode_attention as decode_kernel
from llamaserve.kernels import pointwise, qmatmul
from llamaserve.model.cpu_linear import fuse_projections
from llamaserve.model.row_stability import model_rows_stable
from llamaserve.model.serving import ServingPlan


def prepare_for_serving(model) -> ServingPlan:
    model.pack_weights()
    model.prepare_decode()  # builds the CPU decode kernels now, not in the first request
    return ServingPlan(rows_independent=model.rows_independent,
                       prefill_chunk_invariant=model.prefill_chunk_invariant,
                       rows_stable=functools.partial(model_rows_stable, model))


# ---- packing --------------------------------------------------------------------------------

def pack_weights(model) -> bool:
    """Pack every linear layer for CPU inference (Linear.pack); True if all of them are.
    Afterwards the model only runs forward: its linear weights leave the state_dict."""
    model._whole_step = None  # decided again, now on the packed weights
    if model.device.type == "cpu" and model.dtype == torch.bfloat16 and qmatmul.available():
        _fp32_activations(model)
    for block in model.layers:  # idempotent: a packed layer's plain weights are meta
        attn, ffn = block.attention, block.feed_forward
        if attn.wqkv is None:
            attn.wqkv = fuse_projections([attn.wq, attn.wk, attn.wv])
        attn.wo.pack()
        if ffn.w13 is None:
            ffn.w13 = fuse_projections([ffn.w1, ffn.w3])
        ffn.w2.pack()
    model.output.pack()
    return model.packed


def _norms(model) -> list:
    """Every RMSNorm of the model, in the order the all-layers op takes their weights."""
    blocks = list(model.layers)
    return [b.attention_norm for b in blocks] + [b.ffn_norm for b in blocks] + [model.norm]


def _fp32_activations(model) -> None:
    """On CPU, bf16 (and quantised) weights are read as stored by the qmatmul kernel, and
    the rest runs in fp32 as the decode kernels do: norms, activations, the KV cache (made
    after packing). Each matmul rounds its own input (bf16 weights: to bf16; int4: to int8
    per group) and sums exact products in fp32, batch-invariant by construction."""
    for norm in _norms(model):
        norm.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
    for module in model.modules():
        if hasattr(module, "compute_dtype"):  # quantised layers (weights/quant.py)
            module.compute_dtype = torch.float32
    model._activations_fp32 = True  # model.dtype now says float32: default_kv_cache_dtype remembers


def default_kv_cache_dtype(model) -> torch.dtype:
    """bf16 where bf16 or quantised weights run on the CPU kernels (fp32 activations) and the
    attention kernel takes a bf16 cache (AVX512-BF16, head_dim a multiple of 32): half the bytes
    of every decode step's attention and of the pool, and `vdpbf16ps` arithmetic; fp32 for such
    weights elsewhere; otherwise the model's compute dtype."""
    bf16_weights = model.device.type == "cpu" and (
        getattr(model, "_activations_fp32", False) or (model.dtype == torch.bfloat16 and qmatmul.available()))
    if not bf16_weights:
        return model.dtype
    head_dim = model.layers[0].attention.head_dim
    fits = _shapes_fit(model, torch.float32, model.device) and decode_kernel.bf16_cache_available(head_dim)
    return torch.bfloat16 if fits else torch.float32


def packed(model) -> bool:
    """True when every projection runs packed (all of them or none, in practice)."""
    if getattr(model.output, "packed_weight", None) is None:
        return False
    return all(
        b.attention.wqkv is not None and b.attention.wo.packed_weight is not None
        and b.feed_forward.w13 is not None and b.feed_forward.w2.packed_weight is not None
        for b in model.layers
    )


def rows_independent(model) -> bool:
    """Whether every matmul runs on the qmatmul kernel (bf16 / int8 / int4 weights), whose rows
    have the same bits for any row count from 1 up; the CPU decode kernels and torch's decode
    attention (one row per call) are row-independent too. The runner then pads nothing."""
    def on_kernel(m) -> bool:
        return isinstance(getattr(m, "packed_weight", getattr(m, "packed", None)), qmatmul.PackedWeight)

    return model.packed and all(
        on_kernel(m) for b in model.layers
        for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2)) and on_kernel(model.output)


def prefill_chunk_invariant(model) -> bool:
    """Whether a prompt row's numbers (its keys, values and logits) are the same wherever the
    prompt is cut into chunks: every token a kernel row (decode_kernels_fit) and every matmul
    independent of the row count (rows_independent). The scheduler may then reuse a cached
    prefix at any block boundary, not only at whole prefill chunks."""
    return model.rows_independent and model.decode_kernels_fit()


# ---- every token a row, on the compiled kernels -----------------------------------------------

def kernels_fit(model) -> bool:
    """Whether forward calls run on the compiled kernels, every token as one row (decode steps
    and prefill chunks alike): fp32 on CPU, sizes the kernels take, and the kernels built here
    (see llamaserve.kernels), and a KV cache dtype they take. Decided once per (dtype, device,
    cache dtype), in `model._decode_kernels_fit`."""
    dtype, device, cache_dtype = model.norm.weight.dtype, model.norm.weight.device, model.kv_cache_dtype()
    if model._decode_kernels_fit is None or model._decode_kernels_fit[0] != (dtype, device, cache_dtype):
        fit = _shapes_fit(model, dtype, device) and decode_kernel.cache_supported(
            cache_dtype, model.layers[0].attention.head_dim)
        model._decode_kernels_fit = ((dtype, device, cache_dtype), fit)
    return model._decode_kernels_fit[1]


def _shapes_fit(model, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the attention and pointwise kernels take this model's sizes in `dtype` here."""
    attn = model.layers[0].attention
    return decode_kernel.supports((1, 1, attn.n_heads, attn.head_dim), dtype, device) and pointwise.supports(
        torch.empty(0, model.args.dim, dtype=dtype, device=device))


def prepare_decode(model) -> None:
    """Build (or load) the compiled decode kernels now rather than in the first decode call:
    the all-layers op takes ~10 s to compile on a machine that never built it."""
    if model.decode_kernels_fit():
        model._whole_step_args()


def layers_as_rows(model, h: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   cache) -> torch.Tensor:
    """The layers for h [B, T, dim] with every token a row of its own (a decode step's, or a
    prefill chunk's): each computed alike whatever call it comes in, so prefill is
    chunk-invariant (prefill_chunk_invariant). Returns the final-normed hidden state [B, T, dim]."""
    bsz, seqlen = positions.shape
    if int(positions.max()) >= cache.max_seq_len:
        raise ValueError(f"position {int(positions.max())} is beyond the cache length {cache.max_seq_len}")
    row_slots = slots if seqlen == 1 else slots.repeat_interleave(seqlen)  # a decode step: as they are
    rows = decode_kernel.DecodeRows(rotation.reshape(bsz * seqlen, 1, 1, -1), row_slots, positions,
                                    cache.tables.on_device())
    return _decode_layers(model, h.view(bsz * seqlen, 1, -1), rows, cache).view(bsz, seqlen, -1)


def _decode_layers(model, h: torch.Tensor, rows: decode_kernel.DecodeRows, cache) -> torch.Tensor:
    """The layers for one token per row, returning the final-normed hidden state: all of them
    in one compiled op where the model takes it (`whole_step_args`), else layer by layer
    from Python with the same kernels: attention through the decode kernel, and each
    residual add fused with the RMSNorm after it."""
    whole = model._whole_step_args()
    if whole is not None:
        norms, matmuls, heads, kv_heads, head_dim, hidden, eps = whole
        normed = torch.ops.llamaserve.decode_layers(
            h.view(-1, h.shape[-1]), norms, matmuls, cache.keys, cache.values, rows.block_tables, rows.rotation, rows.slots,
            rows.positions, heads, kv_heads, head_dim, hidden, eps)
        return normed.view(h.shape)
    following_norms = [block.attention_norm for block in model.layers[1:]] + [model.norm]
    first = model.layers[0].attention_norm
    _, normed = pointwise.add_rms_norm(h, None, first.weight, first.eps)
    for block, keys, values, next_norm in zip(model.layers, cache.keys, cache.values, following_norms):
        attended = _attention_rows(block.attention, normed, rows, keys, values)
        h, normed = pointwise.add_rms_norm(h, attended, block.ffn_norm.weight, block.ffn_norm.eps)
        h, normed = pointwise.add_rms_norm(h, _feed_forward_rows(block.feed_forward, normed), next_norm.weight,
                                           next_norm.eps)
    return normed


def _attention_rows(attn, x: torch.Tensor, rows: decode_kernel.DecodeRows, layer_keys, layer_values) -> torch.Tensor:
    """Attention.forward for one token per row through the decode kernel (RoPE, cache write and
    attention in one call)."""
    bsz = x.shape[0]
    q, k, v = attn.wqkv(x) if attn.wqkv is not None else (attn.wq(x), attn.wk(x), attn.wv(x))
    out = decode_kernel.decode_attention(
        q.view(bsz, 1, attn.n_heads, attn.head_dim), k.view(bsz, 1, attn.n_kv_heads, attn.head_dim),
        v.view(bsz, 1, attn.n_kv_heads, attn.head_dim), rows, layer_keys, layer_values, rows.block_tables)
    return attn.tp.all_reduce(attn.wo.forward(out.view(bsz, 1, -1)))


def _feed_forward_rows(ffn, x: torch.Tensor) -> torch.Tensor:
    """FeedForward.forward with SwiGLU's activation as one pointwise kernel call (fp32 CPU activations)."""
    if ffn.w13 is None or ffn.w13.sizes[0] % pointwise.DIM_MULTIPLE:  # e.g. a width split 4 ways
        return ffn.forward(x)
    return ffn.tp.all_reduce(ffn.w2.forward(pointwise.silu_mul(ffn.w13.joined(x))))


def whole_step_args(model):
    """The arguments of the all-layers decode op (kernels/decode_layers.cpp) when this model
    can take it: packed fused weights, one process (no all-reduce between layers), one norm
    eps, and the op built here; else None (the per-layer path). Decided once, in `model._whole_step`."""
    if model._whole_step is None:
        norms = _norms(model)
        attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
        fits = (
            model.tp.size == 1
            and model.packed
            and len({n.eps for n in norms}) == 1
            and ffn.w13 is not None
            and ffn.w13.sizes[0] % pointwise.DIM_MULTIPLE == 0
            and kernels.load_torch_ops("decode_layers")
        )
        args = None
        if fits:
            matmuls = []
            for b in model.layers:
                a, f = b.attention, b.feed_forward
                for m in (a.wqkv.packed, a.wo.packed_weight, f.w13.packed, f.w2.packed_weight):
                    # a oneDNN-packed tensor, or a quantised weight's three (kernels/qmatmul.py)
                    matmuls += m.tensors() if hasattr(m, "tensors") else [m]
            args = ([n.weight.detach().contiguous() for n in norms], matmuls, attn.n_heads, attn.n_kv_heads,
                    attn.head_dim, ffn.w13.sizes[0], float(norms[0].eps))
        model._whole_step = (args,)
    return model._whole_step[0]
