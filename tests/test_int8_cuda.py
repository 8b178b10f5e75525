"""The fused int8 Triton kernel (weights/int8_cuda.py) off a GPU: CPU processes never build it,
and where it cannot be built the dequantising path takes over with one warning. The kernel
itself is checked on a GPU by tests/test_cuda.py."""

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
