"""Llama 2 / 3 / 3.1 transformer: pure compute, tokens + positions + cache -> logits.

Weights use Meta's names and layout (`layers.N.attention.wq.weight`, interleaved RoPE pairs), so
Meta checkpoints load as they are and Hugging Face ones after un-permuting q/k rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve import kernels
from llamaserve.config import ModelArgs
from llamaserve.kernels import decode_attention as decode_kernel
from llamaserve.kernels import pointwise, qmatmul
from llamaserve.model.kv_cache import BLOCK_SIZE, KVCache, kv_bytes_per_token, plan_attention, plan_on_device
from llamaserve.model.parallel import SINGLE, TensorParallel


# Fewest rows of a CPU linear call whose rows do not depend on the row count. oneDNN's inner
# product (packed weights, and plain fp32 ones: `row_stable_mm`) gives each row the same bits
# for any row count from 2 up, whatever the other rows hold; one row takes another kernel.
# Measured with torch 2.13 on Intel AMX and AMD Zen 4 (AVX-512, no AMX) up to 300 rows, where
# MKL's sgemm (F.linear, torch.mm) changes a row's bits at 4, 12 or 16 rows depending on the CPU.
# Each process checks it again for its own CPU and thread count (`linear_rows_stable`) and the
# runner falls back to one row count for every decode call where the check fails.
CPU_ROW_STABLE_MIN = 2
# Row counts up to which tests/test_batch_invariance.py checks every count; the startup check
# samples beyond.
PACKED_ROW_STABLE_MIN, PACKED_ROW_STABLE_MAX = CPU_ROW_STABLE_MIN, 256
# The row count oneDNN tunes the packed layout for. The layout decides the rounding, so it is
# one constant, never the batch at hand.
PACK_ROWS_HINT = 32
# Asked once: torch.compile cannot trace the query inside a step (tests/test_compile_decode.py).
MKLDNN = torch.backends.mkldnn.is_available()


def row_stable_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight^T for an unpacked CPU weight with each row's bits independent of the row count
    (from CPU_ROW_STABLE_MIN rows) and of the other rows, or None off the CPU or below that.

    fp32 goes through oneDNN's inner product on the plain weight (the packed path's kernels);
    other dtypes through `weight @ x^T`, transposed ([rows, out] column-major: the head's logits
    are read in place, no copy). `linear_rows_stable` checks either at startup."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows < CPU_ROW_STABLE_MIN:
        return None
    flat = x.reshape(rows, -1)
    if weight.dtype == torch.float32 and MKLDNN:
        return torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, None, "none", [], "")
    return torch.mm(weight, flat.t()).t()


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.is_meta
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "").view(*x.shape[:-1], out_features)


def _drop_weight(layer: nn.Linear) -> None:
    # A meta stand-in keeps shape and dtype once the packed copy replaces the plain weight.
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)


class FusedProjection:
    """Several same-input linear layers as one packed matmul (q/k/v; w1/w3): one weight pass
    and one call instead of several, which matters where a call costs ~50 us on its own."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.sizes = [layer.out_features for layer in layers]
        self.packed = pack_weight(torch.cat([layer.weight.detach() for layer in layers]))
        for layer in layers:
            _drop_weight(layer)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side in one tensor, unsplit."""
        return packed_linear(x, self.packed, sum(self.sizes))


def kernel_bf16(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight runs on the qmatmul kernel (CPU, built here): read as bf16, times
    the fp32 activations rounded to bf16 (Transformer.pack_weights, kernels/qmatmul.cpp)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not weight.is_meta
            and qmatmul.available())


def fuse_projections(layers: list[nn.Module]):
    """Same-input layers as one matmul: a FusedProjection of packable fp32 layers, bf16 ones on
    the qmatmul kernel, or what the layers' own class fuses them into (quantised ones:
    weights/quant.py), else None."""
    if all(isinstance(w, Linear) and can_pack(w.weight) for w in layers):
        return FusedProjection(layers)
    if all(isinstance(w, Linear) and kernel_bf16(w.weight) for w in layers):
        fused = qmatmul.Fused(qmatmul.pack_bf16(torch.cat([w.weight.detach() for w in layers])),
                              [w.out_features for w in layers])
        for layer in layers:
            _drop_weight(layer)
        return fused
    fuse = getattr(type(layers[0]), "fuse", None)
    return fuse(layers) if fuse is not None else None


class Linear(nn.Linear):
    """nn.Linear whose rows do not depend on the rest of the batch (see the constants above)."""

    packed_weight: torch.Tensor | qmatmul.PackedWeight | None = None

    def pack(self) -> bool:
        """Reorder the weight into oneDNN's layout for CPU inference; False where that does not
        apply. The plain weight is dropped (a meta stand-in keeps its shape and dtype), so a
        packed layer has no usable state_dict: pack only a model that is ready to serve."""
        if self.packed_weight is not None:
            return True
        if kernel_bf16(self.weight):
            self.packed_weight = qmatmul.pack_bf16(self.weight.detach())
        elif can_pack(self.weight):
            self.packed_weight = pack_weight(self.weight)
        else:
            return False
        _drop_weight(self)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.packed_weight, qmatmul.PackedWeight):
            return qmatmul.matmul(x, self.packed_weight)
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.out_features)
        out = row_stable_mm(x, self.weight)
        if out is None:
            return F.linear(x, self.weight)
        return out.contiguous().view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: the same bits as the textbook ops (x * rsqrt(mean(x^2) + eps)), measured.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama 3.1 long-context scaling when asked."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if not args.use_scaled_rope:
        return freqs
    low_wavelen = args.rope_original_max_positions / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_positions / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / args.rope_scale_factor, freqs)
    smooth = (args.rope_original_max_positions / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * scaled / args.rope_scale_factor + smooth * scaled
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd] with (even, odd) pairs rotated; rotation: complex [B, T, 1, hd/2].

    One complex multiply (Meta's formulation) instead of a dozen real ops: 5-10x faster for
    decode-sized inputs, where the op count is what costs."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class Attention(nn.Module):
    # Decode rows on the torch CPU path attend one per call (`_attend_rows`); False batches them
    # (not batch-invariant: for the tests that show what the per-row calls guard against).
    rows_alone = True

    def __init__(self, args: ModelArgs, tp: TensorParallel) -> None:
        super().__init__()
        if args.n_heads % tp.size:
            raise ValueError(f"n_heads {args.n_heads} is not divisible by tensor-parallel size {tp.size}")
        self.tp = tp
        self.n_heads = args.n_heads // tp.size
        self.n_kv_heads = tp.local_kv_heads(args.n_kv_heads)
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: FusedProjection | None = None

    def pack(self) -> None:
        if self.wqkv is None:
            self.wqkv = fuse_projections([self.wq, self.wk, self.wv])
        self.wo.pack()

    def forward(self, x, rotation, positions, layer_keys, layer_values, plan) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x) if self.wqkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)

        # pool: [blocks, kv_heads, block_size, hd]; indexing with [B,T] blocks and [B,T]
        # offsets around a slice addresses [B, T, kv_heads, hd], the layout of k and v.
        layer_keys[plan.write_blocks, :, plan.write_offsets] = k
        layer_values[plan.write_blocks, :, plan.write_offsets] = v
        if seqlen == 1 and x.device.type == "cpu" and self.rows_alone and not plan.device_side:
            out = self._attend_rows(q, positions[:, 0].tolist(), plan, layer_keys, layer_values)
            return self.tp.all_reduce(self.wo(out.reshape(bsz, seqlen, -1)))
        # Each row's blocks gathered in position order: [B, kv_heads, kv_len, hd]. (The decode
        # kernel reads the blocks in place; this path serves prefill and non-kernel decode.)
        keys, values = plan.gather(layer_keys), plan.gather(layer_values)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=plan.mask, enable_gqa=self.n_kv_heads != self.n_heads
        ).transpose(1, 2)  # [B, T, heads, hd]
        return self.tp.all_reduce(self.wo(out.reshape(bsz, seqlen, -1)))

    def _attend_rows(self, q: torch.Tensor, positions: list[int], plan, layer_keys, layer_values):
        """Decode attention on the torch path: one call per row over exactly the keys it sees, so a
        row's call depends on nothing but the row. torch's CPU kernel splits its work by batch
        size and thread count (a row's bits changed between 1 and 2 rows with 2 threads, between
        3 and 8 rows with 4), so one batched call would make a row depend on the batch."""
        gqa = self.n_kv_heads != self.n_heads
        rows = [
            F.scaled_dot_product_attention(q[i : i + 1].transpose(1, 2), plan.gather(layer_keys, i, pos + 1),
                                           plan.gather(layer_values, i, pos + 1), enable_gqa=gqa)
            for i, pos in enumerate(positions)
        ]
        return torch.cat(rows).transpose(1, 2)  # [B, 1, heads, hd]

    def decode(self, x: torch.Tensor, rows: decode_kernel.DecodeRows, layer_keys, layer_values) -> torch.Tensor:
        """forward for one token per row through the decode kernel (RoPE, cache write and
        attention in one call); Transformer.decode_kernels_fit says when it applies."""
        bsz = x.shape[0]
        q, k, v = self.wqkv(x) if self.wqkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        out = decode_kernel.decode_attention(
            q.view(bsz, 1, self.n_heads, self.head_dim), k.view(bsz, 1, self.n_kv_heads, self.head_dim),
            v.view(bsz, 1, self.n_kv_heads, self.head_dim), rows, layer_keys, layer_values, rows.block_tables)
        return self.tp.all_reduce(self.wo.forward(out.view(bsz, 1, -1)))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel) -> None:
        super().__init__()
        if args.hidden_dim % tp.size:
            raise ValueError(f"FFN width {args.hidden_dim} is not divisible by tensor-parallel size {tp.size}")
        hidden = args.hidden_dim // tp.size
        self.tp = tp
        self.w1 = Linear(args.dim, hidden, bias=False)
        self.w2 = Linear(hidden, args.dim, bias=False)
        self.w3 = Linear(args.dim, hidden, bias=False)
        self.w13: FusedProjection | None = None

    def pack(self) -> None:
        if self.w13 is None:
            self.w13 = fuse_projections([self.w1, self.w3])
        self.w2.pack()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """forward with SwiGLU's activation as one pointwise kernel call (fp32 CPU activations)."""
        if self.w13 is None or self.w13.sizes[0] % pointwise.DIM_MULTIPLE:  # e.g. a width split 4 ways
            return self.forward(x)
        return self.tp.all_reduce(self.w2.forward(pointwise.silu_mul(self.w13.joined(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.tp.all_reduce(self.w2(F.silu(gate) * up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel) -> None:
        super().__init__()
        self.attention = Attention(args, tp)
        self.feed_forward = FeedForward(args, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotation, positions, layer_keys, layer_values, plan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotation, positions, layer_keys, layer_values, plan)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        if args.vocab_size % tp.size:
            raise ValueError(f"vocab_size {args.vocab_size} is not divisible by tensor-parallel size {tp.size}")
        self.args = args
        self.tp = tp
        # The embedding is replicated on every rank: it is read one row per token.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size // tp.size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        # ((dtype, device), whether decode runs on the kernels), decided at the first decode call
        self._decode_kernels_fit: tuple[tuple[torch.dtype, torch.device], bool] | None = None
        self._whole_step: tuple | None = None  # (arguments of the all-layers decode op or None,)

    @property
    def dtype(self) -> torch.dtype:
        # Norms are never quantised, so they give the compute dtype even for int8 weights.
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, n_slots: int, max_seq_len: int, num_blocks: int | None = None,
                  block_size: int = BLOCK_SIZE) -> KVCache:
        """A cache of `num_blocks` blocks, or (None) max_seq_len positions for each slot."""
        attn = self.layers[0].attention
        return KVCache(self.args.n_layers, n_slots, attn.n_kv_heads, max_seq_len, attn.head_dim, self.dtype,
                       self.device, num_blocks, block_size)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one position takes on this rank."""
        attn = self.layers[0].attention
        return kv_bytes_per_token(self.args.n_layers, attn.n_kv_heads, attn.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T]; start_pos [B] position of each row's first token; slots [B] cache rows.

        Returns float32 logits [B, V] for each row's last token, or [B, T, V] with `all_logits`.
        """
        bsz, seqlen = tokens.shape
        if seqlen == 1 and not all_logits and self.device.type != "cpu":
            # Off the CPU, decode is the step CUDA graphs capture, so eager runs the same kernels.
            return self.decode_step(tokens, start_pos, slots, cache.tables.on_device(), cache.keys, cache.values)
        positions = start_pos[:, None] + torch.arange(seqlen, device=tokens.device)  # [B, T]
        rotation = self._rotation(positions)

        h = self.tok_embeddings(tokens).to(self.dtype)  # bf16 weights, fp32 activations: pack_weights
        if self.decode_kernels_fit():
            # Every token a row of its own (a decode step's, or a prefill chunk's): each computed
            # alike whatever call it comes in, so prefill is chunk-invariant (prefill_chunk_invariant).
            if int(positions.max()) >= cache.max_seq_len:
                raise ValueError(f"position {int(positions.max())} is beyond the cache length {cache.max_seq_len}")
            rows = decode_kernel.DecodeRows(rotation.reshape(bsz * seqlen, 1, 1, -1), slots.repeat_interleave(seqlen),
                                            positions, cache.tables.on_device())
            normed = self._decode_layers(h.view(bsz * seqlen, 1, -1), rows, cache).view(bsz, seqlen, -1)
            if not all_logits:
                normed = normed[:, -1:]
        else:
            plan = plan_attention(positions, slots, cache)
            for layer, keys, values in zip(self.layers, cache.keys, cache.values):
                h = layer(h, rotation, positions, keys, values, plan)
            if not all_logits:
                h = h[:, -1:]
            normed = self.norm(h)
        logits = self.tp.all_gather_last_dim(self._head(normed)).float()
        return logits if all_logits else logits[:, 0]

    def _rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE rotations for positions [B, T]: complex [B, T, 1, hd/2]."""
        angles = positions[..., None].float() * self.inv_freq  # [B, T, hd/2]
        return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                    keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """One token per row (tokens [B, 1] at positions [B], cache rows slots [B]) on plain torch
        ops with nothing read back to the host: shapes depend only on B and the cache, so the
        step can be captured as a CUDA graph or compiled with torch.compile(fullgraph=True)
        (tests/test_compile_decode.py). Every row reads its whole block table (plan_on_device);
        positions must be below the cache length (checked by the caller, on the host).
        Returns float32 logits [B, V]. The device's decode path; on CPU `forward` keeps its
        kernels and per-row attention."""
        positions = positions.view(-1, 1)
        rotation = self._rotation(positions)
        h = self.tok_embeddings(tokens).to(self.dtype)
        plan = plan_on_device(positions, slots, tables, keys[0].shape[2])
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            h = layer(h, rotation, positions, layer_keys, layer_values, plan)
        return self.tp.all_gather_last_dim(self._head(self.norm(h))).float()[:, 0]

    def decode_kernels_fit(self) -> bool:
        """Whether forward calls run on the compiled kernels, every token as one row (decode steps
        and prefill chunks alike): fp32 on CPU, sizes the kernels take, and the kernels built here
        (see llamaserve.kernels)."""
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        if self._decode_kernels_fit is None or self._decode_kernels_fit[0] != (dtype, device):
            attn = self.layers[0].attention
            fit = decode_kernel.supports((1, 1, attn.n_heads, attn.head_dim), dtype, device) and pointwise.supports(
                torch.empty(0, self.args.dim, dtype=dtype, device=device))
            self._decode_kernels_fit = ((dtype, device), fit)
        return self._decode_kernels_fit[1]

    def _decode_layers(self, h: torch.Tensor, rows: decode_kernel.DecodeRows, cache: KVCache) -> torch.Tensor:
        """The layers for one token per row, returning the final-normed hidden state: all of them
        in one compiled op where the model takes it (`_whole_step_args`), else layer by layer
        from Python with the same kernels: attention through the decode kernel, and each
        residual add fused with the RMSNorm after it."""
        whole = self._whole_step_args()
        if whole is not None:
            norms, matmuls, heads, kv_heads, head_dim, hidden, eps = whole
            normed = torch.ops.llamaserve.decode_layers(
                h.view(-1, h.shape[-1]), norms, matmuls, cache.keys, cache.values, rows.block_tables, rows.rotation, rows.slots,
                rows.positions, heads, kv_heads, head_dim, hidden, eps)
            return normed.view(h.shape)
        following_norms = [block.attention_norm for block in self.layers[1:]] + [self.norm]
        first = self.layers[0].attention_norm
        _, normed = pointwise.add_rms_norm(h, None, first.weight, first.eps)
        for block, keys, values, next_norm in zip(self.layers, cache.keys, cache.values, following_norms):
            attended = block.attention.decode(normed, rows, keys, values)
            h, normed = pointwise.add_rms_norm(h, attended, block.ffn_norm.weight, block.ffn_norm.eps)
            h, normed = pointwise.add_rms_norm(h, block.feed_forward.decode(normed), next_norm.weight, next_norm.eps)
        return normed

    def prepare_decode(self) -> None:
        """Build (or load) the compiled decode kernels now rather than in the first decode call:
        the all-layers op takes ~10 s to compile on a machine that never built it."""
        if self.decode_kernels_fit():
            self._whole_step_args()

    def _whole_step_args(self):
        """The arguments of the all-layers decode op (kernels/decode_layers.cpp) when this model
        can take it: packed fused weights, one process (no all-reduce between layers), one norm
        eps, and the op built here; else None (the per-layer path)."""
        if self._whole_step is None:
            blocks = list(self.layers)
            norms = [b.attention_norm for b in blocks] + [b.ffn_norm for b in blocks] + [self.norm]
            attn, ffn = blocks[0].attention, blocks[0].feed_forward
            fits = (
                self.tp.size == 1
                and self.packed
                and len({n.eps for n in norms}) == 1
                and ffn.w13 is not None
                and ffn.w13.sizes[0] % pointwise.DIM_MULTIPLE == 0
                and kernels.load_torch_ops("decode_layers")
            )
            args = None
            if fits:
                matmuls = []
                for b in blocks:
                    a, f = b.attention, b.feed_forward
                    for m in (a.wqkv.packed, a.wo.packed_weight, f.w13.packed, f.w2.packed_weight):
                        # a oneDNN-packed tensor, or a quantised weight's three (kernels/qmatmul.py)
                        matmuls += m.tensors() if hasattr(m, "tensors") else [m]
                args = ([n.weight.detach().contiguous() for n in norms], matmuls, attn.n_heads, attn.n_kv_heads,
                        attn.head_dim, ffn.w13.sizes[0], float(norms[0].eps))
            self._whole_step = (args,)
        return self._whole_step[0]

    def pack_weights(self) -> bool:
        """Pack every linear layer for CPU inference (Linear.pack); True if all of them are.
        Afterwards the model only runs forward: its linear weights leave the state_dict."""
        self._whole_step = None  # decided again, now on the packed weights
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and qmatmul.available():
            self._fp32_activations()
        for block in self.layers:
            block.attention.pack()  # idempotent: a packed layer's plain weights are meta
            block.feed_forward.pack()
        self.output.pack()
        return self.packed

    def _fp32_activations(self) -> None:
        """On CPU, bf16 (and quantised) weights are read as stored by the qmatmul kernel, and
        the rest runs in fp32 as the decode kernels do: norms, activations, the KV cache (made
        after packing). Each matmul rounds its own input (bf16 weights: to bf16; int4: to int8
        per group) and sums exact products in fp32, batch-invariant by construction."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=False)
            elif hasattr(module, "compute_dtype"):  # quantised layers (weights/quant.py)
                module.compute_dtype = torch.float32

    @property
    def rows_independent(self) -> bool:
        """Whether every matmul runs on the qmatmul kernel (bf16 / int8 / int4 weights), whose rows
        have the same bits for any row count from 1 up; the CPU decode kernels and torch's decode
        attention (one row per call) are row-independent too. The runner then pads nothing."""
        def on_kernel(m) -> bool:
            return isinstance(getattr(m, "packed_weight", getattr(m, "packed", None)), qmatmul.PackedWeight)

        return self.packed and all(
            on_kernel(m) for b in self.layers
            for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2)) and on_kernel(self.output)

    @property
    def prefill_chunk_invariant(self) -> bool:
        """Whether a prompt row's numbers (its keys, values and logits) are the same wherever the
        prompt is cut into chunks: every token a kernel row (decode_kernels_fit) and every matmul
        independent of the row count (rows_independent). The scheduler may then reuse a cached
        prefix at any block boundary, not only at whole prefill chunks."""
        return self.rows_independent and self.decode_kernels_fit()

    @property
    def packed(self) -> bool:
        """True when every projection runs packed (all of them or none, in practice)."""
        if getattr(self.output, "packed_weight", None) is None:
            return False
        return all(
            b.attention.wqkv is not None and b.attention.wo.packed_weight is not None
            and b.feed_forward.w13 is not None and b.feed_forward.w2.packed_weight is not None
            for b in self.layers
        )

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection. With unpacked CPU weights the decode logits stay column-major (no
        16 MB copy at 32 rows of a 128k vocabulary), which the sampler reads in place."""
        unpacked = isinstance(self.output, Linear) and self.output.packed_weight is None
        out = row_stable_mm(h, self.output.weight) if unpacked else None
        if out is None:
            return self.output(h)
        return out.view(*h.shape[:-1], -1)
