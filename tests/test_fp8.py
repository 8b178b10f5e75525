"""--quantize fp8 (weights/fp8.py): e4m3 numerics, the emulated matmul against an exact
reference of the same operands, logits against fp32, the engine's alone-vs-crowd identity, the
converted-weight cache, and the errors for what fp8 cannot do. On a GPU with FP8 tensor cores
tests/test_cuda.py checks `torch._scaled_mm` against this emulation."""

from __future__ import annotations

import pytest
import torch
from checkpoints import random_weights, tiny_args, write_meta
from engine_util import tiny_model
from test_quant import GQA, LLAMA2, all_logits, fp32_model, rel_error

from llamaserve.engine.args import EngineArgs
from llamaserve.weights import load_model
from llamaserve.weights.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8, quantize_rows
from llamaserve.weights.quant import QuantEmbedding, QuantLinear, build_quantized_model, quantize_model, weight_bytes

# e4m3 keeps 3 mantissa bits: rounding is within 2^-4 of a value in the normal range, and within
# half the smallest subnormal step (2^-9 / 2) of the scale below it (|q| < 2^-6).
HALF_ULP = 2.0**-4
HALF_SUBNORMAL = 2.0**-10
# ||fp8 - fp32|| / ||fp32|| of all logits: weights and activations both rounded to 3 mantissa
# bits at every matmul. Measured 7.2% (GQA) and 7.4% (Llama 2 shape) on these random nets,
# whose int8 (weights only, 7 bits) error is 1.5%; random nets carry every layer's noise to the
# logits undamped (tests/test_quant.py).
FP8_REL = 0.10


def test_quantize_fp8_one_scale_per_output_channel_and_the_error_bound():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 96, generator=gen) * torch.logspace(-4, 2, 16)[:, None]  # rows of very different ranges
    w[3] = 0.0
    w[5, 7] = -1e3 * w[5].abs().max()  # one outlier: its row's scale follows it
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (16,)
    nonzero = torch.arange(16) != 3
    torch.testing.assert_close(scale[nonzero], w.abs().amax(1)[nonzero] / FP8_MAX, rtol=0, atol=0)
    # Each row's largest magnitude is e4m3's largest value exactly: the whole range is used.
    assert torch.equal(q.float().abs().amax(1)[nonzero], torch.full((15,), FP8_MAX))
    assert q[5, 7].float() == -FP8_MAX
    # Zeros stay exactly zero, an all-zero row included (and its scale is finite).
    assert torch.equal(dequantize_fp8(q, scale)[3], torch.zeros(96)) and scale[3] == 1.0
    err = (dequantize_fp8(q, scale) - w).abs()
    bound = torch.maximum(w.abs() * HALF_ULP, scale[:, None] * HALF_SUBNORMAL) * (1 + 1e-6)
    assert (err <= bound).all()
    assert err.max() > 0  # a real rounding, not a copy
    assert torch.isfinite(dequantize_fp8(q, scale)).all()
    w[0, :4] = 0.0
    assert torch.equal(dequantize_fp8(*quantize_fp8(w))[0, :4], torch.zeros(4))


def test_quantize_saturates_at_448_instead_of_overflowing():
    """Values past the range (an activation scale from another row, say) clamp to +-448, never NaN."""
    q, scale = quantize_fp8(torch.tensor([[1.0, -2.0, 4.0]]))
    assert q.float().tolist() == [[112.0, -224.0, 448.0]]
    wide = (torch.tensor([[1.0, -1e9, 1e9, 500.0]]) / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert wide.float().tolist() == [[112.0, -448.0, 448.0, 448.0]]


def test_activation_rows_are_quantised_on_their_own():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=gen)
    x[2] *= 1000
    q, scale = quantize_rows(x)
    assert scale.shape == (5, 1)
    q_alone, scale_alone = quantize_rows(x[1:2])
    assert torch.equal(q[1:2].view(torch.uint8), q_alone.view(torch.uint8)) and torch.equal(scale[1:2], scale_alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_matmul_is_the_exact_product_of_the_fp8_operands(dtype):
    """What _scaled_mm computes: e4m3 activations (per row) times e4m3 weights, summed, then both
    scales; only the summation order and the output rounding may differ."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=gen) * 0.02
    x = torch.randn(7, 128, generator=gen).to(dtype)
    wq, ws = quantize_fp8(w)
    xq, xs = quantize_rows(x)
    exact = (xq.double() @ wq.double().t()) * xs.double() * ws.double()[None, :]
    got = fp8_linear(x, wq, ws)
    assert got.dtype == dtype and got.shape == (7, 48)
    assert rel_error(got.double(), exact) < (1e-6 if dtype == torch.float32 else 1e-2)  # bf16: output rounding
    # Row-stable: a row's bits do not depend on the other rows (from two rows up, as every CPU linear).
    assert torch.equal(fp8_linear(x[2:4], wq, ws), got[2:4])


@pytest.mark.parametrize("args", [GQA, LLAMA2], ids=["gqa", "llama2"])
def test_fp8_logits_within_ten_percent_of_fp32(args):
    ref = fp32_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    want = all_logits(ref, tokens)
    for dtype in (torch.float32, torch.bfloat16):
        q = quantize_model(fp32_model(args).to(dtype), "fp8")
        assert q.layers[0].attention.wq.weight.dtype == FP8_DTYPE and q.dtype == dtype
        err = rel_error(all_logits(q, tokens).float(), want)
        assert 0.01 < err < FP8_REL, (dtype, err)


def test_fp8_modules_and_memory():
    ref = fp32_model(GQA)
    fp32_bytes = weight_bytes(ref)
    q = quantize_model(ref, "fp8")
    assert isinstance(q.tok_embeddings, QuantEmbedding) and isinstance(q.output, QuantLinear)
    assert all(m.mode == "fp8" for m in q.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    assert q.norm.weight.dtype == torch.float32
    assert 0.25 <= weight_bytes(q) / fp32_bytes < 0.27
    # Rebuilt from its own state dict: the same tensors, the same logits.
    again = build_quantized_model(GQA, q.state_dict())
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(all_logits(again, tokens), all_logits(q, tokens))


def test_fp8_engine_gives_identical_tokens_alone_and_in_a_changing_crowd():
    from test_engine import test_requests_give_identical_tokens_alone_and_in_a_changing_crowd as crowd

    crowd(quantize_model(tiny_model(), "fp8"))


def test_fp8_alone_equals_crowd_on_a_wide_model():
    """dim 768: wide enough that a row's bits change with the row count unless the engine holds
    them fixed (tests/test_determinism.py); greedy and seeded probes, logprobs compared exactly."""
    from test_determinism import alone_and_crowd, wide_model

    alone, crowd, _ = alone_and_crowd(quantize_model(wide_model(), "fp8"))
    assert crowd == alone


def test_fp8_through_the_weight_cache(tmp_path):
    from llamaserve.weights.cache import list_entries
    from llamaserve.weights.safetensors_io import read_header

    args = tiny_args("llama3", small_vocab=True)
    meta = write_meta(tmp_path / "meta", args, random_weights(args, seed=3), n_shards=1)
    root = tmp_path / "cache"
    built = load_model(meta, progress=False, quantize="fp8", cache_root=root).model
    [entry] = list_entries(root)
    assert "fp8" in entry.name
    header, _, _ = read_header(entry / "weights.safetensors")
    assert header["layers.0.attention.wq.weight"]["dtype"] == "F8_E4M3"
    assert header["layers.0.attention.wq.scale"]["dtype"] == "F32"
    hit = load_model(meta, progress=False, quantize="fp8", cache_root=root).model  # mmapped back
    assert list_entries(root) == [entry]
    uncached = load_model(meta, progress=False, quantize="fp8").model
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    want = all_logits(built, tokens)
    assert torch.equal(all_logits(hit, tokens), want) and torch.equal(all_logits(uncached, tokens), want)


def test_fp8_refuses_float16_compute_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--quantize fp8 computes in bfloat16 or float32, not float16"):
        load_model(None, dtype=torch.float16, progress=False, quantize="fp8")
    with pytest.raises(ValueError, match="--quantize fp8 computes in bfloat16 or float32, not float16"):
        load_model(None, dtype="float16", progress=False, quantize="fp8", cache_root=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before converting anything
    with pytest.raises(ValueError, match="--quantize fp8 computes in bfloat16 or float32, not float16; use --dtype"):
        EngineArgs(quantize="fp8", dtype="float16").validate(cli=True)
    EngineArgs(quantize="fp8", dtype="bfloat16").validate(cli=True)


def test_cli_takes_quantize_fp8():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--quantize", "fp8"])
    assert EngineArgs.from_cli_args(ns, env={}).quantize == "fp8"
    assert "fp8" in parser.format_help()


def test_negative_control_one_activation_scale_per_batch_makes_the_crowd_differ(monkeypatch):
    """Per-row activation scales are what keep a row's bits its own: with one scale for the whole
    batch (a tensor-wise FP8 recipe) the crowd changes the rows."""
    from test_determinism import alone_and_crowd, wide_model

    from llamaserve.weights import fp8

    def per_batch(x):
        q, _ = quantize_fp8(x.reshape(1, -1))
        scale = x.float().abs().amax().clamp(min=1e-30) / FP8_MAX
        return q.view(x.shape), scale.expand(x.shape[0], 1)

    monkeypatch.setattr(fp8, "quantize_rows", per_batch)
    alone, crowd, _ = alone_and_crowd(quantize_model(wide_model(), "fp8"))
    assert crowd != alone


def test_same_input_fp8_layers_are_fused_when_the_model_is_packed():
    """q/k/v and w1/w3 become one matmul each (activations quantised once); the layers' own
    tensors are dropped, so the weights are not held twice; the logits stay those of the
    separate layers (every row's own quantisation, sums within fp32 rounding)."""
    from llamaserve.weights.fp8 import FusedFp8

    model = quantize_model(fp32_model(GQA), "fp8")
    tokens = torch.randint(0, GQA.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    separate = all_logits(model, tokens)
    before = weight_bytes(model)
    model.pack_weights()
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance(attn.wqkv, FusedFp8) and isinstance(ffn.w13, FusedFp8)
    assert attn.wq.weight.is_meta and ffn.w1.weight.is_meta
    assert attn.wqkv.weight.dtype == FP8_DTYPE and attn.wqkv.sizes == [128, 32, 32]
    held = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta and n != "inv_freq"]
    fused_bytes = sum(t.numel() * t.element_size() for t in held) + sum(
        f.weight.numel() + 4 * f.scale.numel() for b in model.layers for f in (b.attention.wqkv, b.feed_forward.w13))
    assert fused_bytes == before
    assert rel_error(all_logits(model, tokens), separate) < 1e-5
