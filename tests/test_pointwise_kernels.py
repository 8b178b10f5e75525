"""The compiled pointwise kernels of decode: residual add + RMSNorm, and SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaserve.kernels import pointwise

pytestmark = pytest.mark.skipif(not pointwise.supports(torch.zeros(16)), reason="no C++ compiler for the kernels")


def test_add_rms_norm_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x, delta = torch.randn(5, 1, 96, generator=gen), torch.randn(5, 1, 96, generator=gen)
    weight = torch.rand(96, generator=gen) + 0.5
    x_before = x.clone()
    h, normed = pointwise.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(h, x + delta, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (96,), eps=1e-5) * weight, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, x_before), "inputs must be left as they are"


def test_rms_norm_alone_when_there_is_no_residual():
    x = torch.randn(3, 1, 64) * 10
    weight = torch.randn(64)
    h, normed = pointwise.add_rms_norm(x, None, weight, 1e-6)
    assert h is x or torch.equal(h, x)
    torch.testing.assert_close(normed, F.rms_norm(x, (64,), eps=1e-6) * weight, rtol=1e-6, atol=1e-6)


def test_silu_mul_matches_torch_including_large_gates():
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(4, 1, 64, generator=gen) * 4
    gate[0, 0, :8] = torch.tensor([-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 200.0])
    up = torch.randn(4, 1, 64, generator=gen)
    out = pointwise.silu_mul(torch.cat([gate, up], dim=-1))
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2e-6, atol=1e-7)


def test_rows_never_depend_on_each_other():
    gen = torch.Generator().manual_seed(2)
    x, delta, gate_up = torch.randn(7, 1, 128, generator=gen), torch.randn(7, 1, 128, generator=gen), torch.randn(
        7, 1, 512, generator=gen)
    weight = torch.randn(128, generator=gen)
    h_all, n_all = pointwise.add_rms_norm(x, delta, weight, 1e-5)
    act_all = pointwise.silu_mul(gate_up)
    for row in range(7):
        pick = slice(row, row + 1)
        h, n = pointwise.add_rms_norm(x[pick], delta[pick], weight, 1e-5)
        assert torch.equal(h, h_all[pick]) and torch.equal(n, n_all[pick])
        assert torch.equal(pointwise.silu_mul(gate_up[pick]), act_all[pick])


def test_sizes_the_kernels_cannot_take():
    assert not pointwise.supports(torch.zeros(2, 1, 24))
    assert not pointwise.supports(torch.zeros(2, 1, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 16"):
        pointwise.add_rms_norm(torch.zeros(2, 24), None, torch.ones(24), 1e-5)
