"""The fused int8 Triton kernel (weights/int8_cuda.py) off a GPU: CPU processes never build it,
and where it cannot be built the dequantising path takes over with one warning; its arithmetic
in Triton's interpreter. The kernel itself is checked on a GPU by tests/test_cuda.py."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_util import tiny_model

from llamaserve.weights import int8_cuda
from llamaserve.weights.quant import quantize_model


@pytest.fixture(autouse=True)
def fresh_kernel_state(monkeypatch):
    monkeypatch.setattr(int8_cuda, "_kernel", None)
    monkeypatch.setattr(int8_cuda, "_launched", False)


def test_cpu_int8_layers_never_touch_triton(monkeypatch):
    def no_build():
        raise AssertionError("the Triton kernel was asked for on a CPU")

    monkeypatch.setattr(int8_cuda, "_build", no_build)
    model = quantize_model(tiny_model(), "int8")
    cache = model.new_cache(2, 32)
    logits = model(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.zeros(2, dtype=torch.long), torch.arange(2), cache)
    assert torch.isfinite(logits).all()
    assert int8_cuda._kernel is None
    assert not int8_cuda.applies(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.int8))


def test_without_triton_the_dequantising_path_takes_over_with_one_warning(monkeypatch, caplog):
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(int8_cuda, "_build", no_triton)
    x, w, s = torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with caplog.at_level(logging.WARNING, logger=int8_cuda.__name__):
        assert int8_cuda.matmul(x, w, s) is None
        assert int8_cuda.matmul(x, w, s) is None
    assert [r.getMessage() for r in caplog.records] == [
        "int8 Triton kernel unavailable, int8 layers dequantise on every call: No module named 'triton'"]
    assert int8_cuda._kernel is False


def test_row_blocks_cover_decode_calls_in_one_tile():
    assert [int8_cuda._row_block(r) for r in (1, 16, 17, 32, 33, 64, 512)] == [16, 16, 32, 32, 64, 64, 64]


INTERPRETED = '''
import sys
import torch
sys.path.insert(0, sys.argv[1])
from llamaserve.weights import int8_cuda
from llamaserve.weights.quant import quantize_tensor as quantize_int8

g = torch.Generator().manual_seed(0)
# Widths that are and are not multiples of the tiles (BLOCK_N 64, BLOCK_K 128); row counts of
# every tile class (16, 32, 64 rows a tile) and past one tile.
for out_f, in_f in ((64, 128), (96, 200), (130, 384)):
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    q, scale = quantize_int8(w)
    exact = q.double() * scale.double().view(-1, 1)
    for rows in (1, 16, 17, 33, 70):
        # fp16 only: Triton's interpreter computes a bf16 tl.dot wrongly (a 16 x 16 bf16 dot
        # there is off by 3e10; the same kernel in fp16 is right), and the kernel is one code for
        # both dtypes: indexing, masks and scales are what this checks.
        for dtype in (torch.float16,):
            x = torch.randn(rows, in_f, generator=g).to(dtype)
            got = int8_cuda.matmul(x, q, scale)
            assert got is not None and got.dtype == dtype and got.shape == (rows, out_f)
            want = x.double() @ exact.t()
            err = float((got.double() - want).abs().max() / want.abs().max())
            assert err < 2e-3, (out_f, in_f, rows, dtype, err)  # fp16 output rounding: 2^-11 of a value
            # A row's bits do not depend on the other rows of its call (same tile class).
            x2 = x.clone()
            x2[1:] = torch.randn(rows - 1, in_f, generator=g).to(dtype) if rows > 1 else x2[1:]
            again = int8_cuda.matmul(x2, q, scale)
            assert torch.equal(again[0], got[0]), (out_f, in_f, rows)
    # 3-D activations keep their leading shape.
    x = torch.randn(2, 5, in_f, generator=g).to(torch.float16)
    assert int8_cuda.matmul(x, q, scale).shape == (2, 5, out_f)
print("int8 kernel ok")
'''


def test_the_int8_kernel_in_the_triton_interpreter(tmp_path):
    """The kernel's arithmetic on the CPU, in Triton's interpreter (TRITON_INTERPRET=1 is read
    when triton is imported: a fresh process): the dequantised product within the output's
    rounding, for widths that are not multiples of the tiles and every row-tile class, and a
    row's bits independent of the other rows. On a GPU test_cuda.py checks it in bf16."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = tmp_path / "int8_check.py"
    script.write_text(INTERPRETED)
    src = str(Path(__file__).resolve().parents[1] / "src")
    run = subprocess.run([sys.executable, str(script), src], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "int8 kernel ok" in run.stdout
