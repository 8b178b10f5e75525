"""Llama 2 / 3 / 3.1 transformer: pure compute, tokens + positions + cache -> logits.

Weights use Meta's names and layout (`layers.N.attention.wq.weight`, interleaved RoPE pairs), so
Meta checkpoints load as they are and Hugging Face ones after un-permuting q/k rows.

How it is served on a CPU (packed and fused weights, every token a row of the compiled kernels)
is model/cpu_backend.py's business; `prepare_for_serving` hands the model to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.config import ModelArgs
from llamaserve.model import cpu_backend, cuda_attention
from llamaserve.model.cpu_linear import Linear
from llamaserve.model.kv_cache import (BLOCK_SIZE, KVCache, kv_bytes_per_token, plan_attention, plan_on_device,
                                       to_cache)
from llamaserve.model.parallel import SINGLE, TensorParallel
from llamaserve.model.serving import ServingPlan


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
        # q/k/v as one matmul, set by a serving backend that fuses them (model/cpu_backend.py)
        self.wqkv = None

    def forward(self, x, rotation, positions, layer_keys, layer_values, plan) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x) if self.wqkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)

        # pool: [blocks, kv_heads, block_size, hd]; indexing with [B,T] blocks and [B,T]
        # offsets around a slice addresses [B, T, kv_heads, hd], the layout of k and v.
        layer_keys[plan.write_blocks, :, plan.write_offsets] = to_cache(k, layer_keys.dtype)
        layer_values[plan.write_blocks, :, plan.write_offsets] = to_cache(v, layer_values.dtype)
        if seqlen == 1 and x.device.type == "cpu" and self.rows_alone and not plan.device_side:
            out = self._attend_rows(q, positions[:, 0].tolist(), plan, layer_keys, layer_values)
            return self.tp.all_reduce(self.wo(out.reshape(bsz, seqlen, -1)))
        if plan.device_side and cuda_attention.applies(q, layer_keys):
            # The device decode step: each row's blocks read in place (Triton), no gathered copy.
            out = cuda_attention.decode(q[:, 0], layer_keys, layer_values, plan.read_blocks, positions)
            if out is not None:
                return self.tp.all_reduce(self.wo(out.reshape(bsz, seqlen, -1)))
        # Each row's blocks gathered in position order: [B, kv_heads, kv_len, hd]. (The decode
        # kernel reads the blocks in place; this path serves prefill and non-kernel decode.)
        keys, values = plan.gather(layer_keys).to(q.dtype), plan.gather(layer_values).to(q.dtype)
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
            F.scaled_dot_product_attention(q[i : i + 1].transpose(1, 2), plan.gather(layer_keys, i, pos + 1).to(q.dtype),
                                           plan.gather(layer_values, i, pos + 1).to(q.dtype), enable_gqa=gqa)
            for i, pos in enumerate(positions)
        ]
        return torch.cat(rows).transpose(1, 2)  # [B, 1, heads, hd]


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
        self.w13 = None  # w1/w3 as one matmul, likewise

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
        # ((dtype, device, cache dtype), whether decode runs on the kernels), decided at the first call
        self._decode_kernels_fit: tuple[tuple, bool] | None = None
        self._whole_step: tuple | None = None  # (arguments of the all-layers decode op or None,)
        # The KV cache's dtype as asked (--kv-cache-dtype); None: kv_cache_dtype() decides.
        self.kv_cache_dtype_request: torch.dtype | None = None

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
        dtype = self.kv_cache_dtype()
        # A bf16 cache on the CPU kernels is in their layout (cpu_backend: bf16 cache).
        kernel_layout = dtype == torch.bfloat16 and self.decode_kernels_fit()
        return KVCache(self.args.n_layers, n_slots, attn.n_kv_heads, max_seq_len, attn.head_dim, dtype, self.device,
                       num_blocks, block_size, kernel_layout)

    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache stores: as asked, else the compute dtype, except that on CPU kernels
        bf16 (and quantised) weights get a bf16 cache where the attention kernel takes one
        (model/cpu_backend.py). The same before and after packing, so the engine can size the
        pool before the runner packs."""
        if self.kv_cache_dtype_request is not None:
            return self.kv_cache_dtype_request
        return cpu_backend.default_kv_cache_dtype(self)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one position takes on this rank."""
        attn = self.layers[0].attention
        return kv_bytes_per_token(self.args.n_layers, attn.n_kv_heads, attn.head_dim, self.kv_cache_dtype())

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
        kernels = self.decode_kernels_fit()
        if cache.kernel_layout and not kernels:
            raise ValueError("this KV cache is in the CPU attention kernel's bf16 layout, and this model no longer "
                             "runs on the kernels: make a new cache (model.new_cache)")
        if kernels:
            normed = cpu_backend.layers_as_rows(self, h, rotation, positions, slots, cache)
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

    # ---- the CPU serving backend (model/cpu_backend.py) -------------------------------------
    # Members rather than calls into the backend so that one model can be told to skip a part
    # (tests: `model.decode_kernels_fit = lambda: False`, the torch path of LLAMASERVE_KERNELS=0).
    def prepare_for_serving(self) -> ServingPlan:
        """Pack the weights, build the kernels; what the runner needs to know about the result."""
        return cpu_backend.prepare_for_serving(self)

    def pack_weights(self) -> bool:
        return cpu_backend.pack_weights(self)

    def prepare_decode(self) -> None:
        cpu_backend.prepare_decode(self)

    def decode_kernels_fit(self) -> bool:
        return cpu_backend.kernels_fit(self)

    def _whole_step_args(self):
        return cpu_backend.whole_step_args(self)

    packed = property(cpu_backend.packed)
    rows_independent = property(cpu_backend.rows_independent)
    prefill_chunk_invariant = property(cpu_backend.prefill_chunk_invariant)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection: logits [..., V], row-major."""
        return self.output(h)
