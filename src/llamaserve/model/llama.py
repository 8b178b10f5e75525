"""Llama 2 / 3 / 3.1 transformer: pure compute, tokens + positions + cache -> logits.

Weights use Meta's names and layout (`layers.N.attention.wq.weight`, interleaved RoPE pairs), so
Meta checkpoints load as they are and Hugging Face ones after un-permuting q/k rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamaserve.config import ModelArgs
from llamaserve.model.kv_cache import KVCache, plan_attention
from llamaserve.model.parallel import SINGLE, TensorParallel


# On CPU, `weight @ x^T` gives every row of x the same bits for any row count in this range,
# whatever the other rows hold (measured for torch 2.13's CPU BLAS and checked by
# tests/test_batch_invariance.py); F.linear needs 16+ rows for that, and is slower here for
# decode-sized batches. Batches outside the range fall back to F.linear.
CPU_ROW_STABLE_MIN, CPU_ROW_STABLE_MAX = 2, 56


def row_stable_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight^T as weight @ x^T, transposed ([rows, out] column-major), or None if the
    row count is outside the row-stable range or not on CPU."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not CPU_ROW_STABLE_MIN <= rows <= CPU_ROW_STABLE_MAX:
        return None
    return torch.mm(weight, x.reshape(rows, -1).t()).t()


class Linear(nn.Linear):
    """nn.Linear whose rows do not depend on the rest of the batch (see row_stable_mm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd] with (even, odd) pairs rotated; cos/sin: [B, T, 1, hd/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, hd/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
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

    def forward(self, x, cos, sin, positions, layer_keys, layer_values, plan) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # cache: [slots, kv_heads, max_seq_len, hd]; indexing with [B,1] slots and [B,T]
        # positions around a slice addresses [B, T, kv_heads, hd], the layout of k and v.
        layer_keys[plan.slots[:, None], :, positions] = k
        layer_values[plan.slots[:, None], :, positions] = v
        if plan.slot_range is not None:
            first, end = plan.slot_range
            keys = layer_keys[first:end, :, : plan.kv_len]  # view [B, kv_heads, kv_len, hd]
            values = layer_values[first:end, :, : plan.kv_len]
        else:
            keys = layer_keys[plan.slots, :, : plan.kv_len]  # gathered copy
            values = layer_values[plan.slots, :, : plan.kv_len]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=plan.mask, enable_gqa=self.n_kv_heads != self.n_heads
        ).transpose(1, 2)  # [B, T, heads, hd]
        return self.tp.all_reduce(self.wo(out.reshape(bsz, seqlen, -1)))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel) -> None:
        super().__init__()
        self.attention = Attention(args, tp)
        self.feed_forward = FeedForward(args, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, positions, layer_keys, layer_values, plan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, layer_keys, layer_values, plan)
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

    @property
    def dtype(self) -> torch.dtype:
        # Norms are never quantised, so they give the compute dtype even for int8 weights.
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, n_slots: int, max_seq_len: int) -> KVCache:
        attn = self.layers[0].attention
        return KVCache(
            self.args.n_layers, n_slots, attn.n_kv_heads, max_seq_len, attn.head_dim, self.dtype, self.device
        )

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
        positions = start_pos[:, None] + torch.arange(seqlen, device=tokens.device)  # [B, T]
        plan = plan_attention(positions, slots, cache.max_seq_len)
        angles = positions[..., None].float() * self.inv_freq  # [B, T, hd/2]
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

        h = self.tok_embeddings(tokens)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            h = layer(h, cos, sin, positions, keys, values, plan)
        if not all_logits:
            h = h[:, -1:]
        logits = self.tp.all_gather_last_dim(self._head(self.norm(h))).float()
        return logits if all_logits else logits[:, 0]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection; for decode batches the logits stay column-major (no 16 MB copy
        at 32 rows of a 128k vocabulary), which the sampler reads in place."""
        out = row_stable_mm(h, self.output.weight) if isinstance(self.output, Linear) else None
        if out is None:
            return self.output(h)
        return out.view(*h.shape[:-1], -1)
