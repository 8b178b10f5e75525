"""The per-process check that decides the CPU decode padding (model/row_stability.py)."""

import pytest
import torch

from llamaserve.config import ModelArgs
from llamaserve.engine.runner import ModelRunner
from llamaserve.model import cpu_linear
from llamaserve.model import row_stability as rs
from llamaserve.model.llama import Transformer
from llamaserve.weights.builtin import random_state_dict


@pytest.fixture(autouse=True)
def _fresh_check():
    rs.linear_rows_stable.cache_clear()
    yield
    rs.linear_rows_stable.cache_clear()


def _split_k_from_4_rows(x, weight):
    """A kernel that, like MKL's sgemm on some CPUs, rounds differently from 4 rows up (it
    sums the inner dimension in two halves there)."""
    rows = x.numel() // x.shape[-1]
    if rows < 2:
        return None
    flat, half = x.reshape(rows, -1), x.shape[-1] // 2
    if rows < 4:
        return flat @ weight.t()
    return flat[:, :half] @ weight[:, :half].t() + flat[:, half:] @ weight[:, half:].t()


def test_the_engine_paths_pass_the_check_here():
    for dtype in (torch.float32, torch.bfloat16):
        assert rs.linear_rows_stable(dtype, False, (64, 768), 80), dtype
    assert rs.linear_rows_stable(torch.float32, True, (64, 768), 80)


def test_the_check_catches_a_kernel_that_changes_with_the_row_count(monkeypatch):
    monkeypatch.setattr(rs, "row_stable_mm", _split_k_from_4_rows)
    assert not rs.linear_rows_stable(torch.float32, False, (64, 768), 8)
    assert rs.linear_rows_stable(torch.float32, False, (64, 768), 3)  # only 2 and 3 rows: one kernel
    assert rs.probe_row_counts(300)[:3] == [2, 3, 4] and rs.probe_row_counts(300)[-1] == 300


def _model():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3, std=0.1), strict=False)
    model.pack_weights = lambda: False  # stays unpacked: its layers run row_stable_mm
    return model


def test_runner_pads_decode_to_two_rows_where_the_check_passes():
    runner = ModelRunner(_model(), max_users=8, max_seq_len=64)
    assert runner.min_decode_rows == 2 and runner.n_slots == 8


def test_runner_gives_every_decode_call_every_slot_where_the_check_fails(monkeypatch):
    monkeypatch.setattr(rs, "row_stable_mm", _split_k_from_4_rows)
    monkeypatch.setattr(cpu_linear, "row_stable_mm", _split_k_from_4_rows)
    runner = ModelRunner(_model(), max_users=8, max_seq_len=64)
    assert runner.min_decode_rows == 8 and runner.n_slots == 8
    assert _alone_and_in_a_crowd(runner)[0]
    # Negative control: padded to 2 rows only, the same kernel gives the user other bits in a crowd.
    assert not _alone_and_in_a_crowd(ModelRunner(_model(), max_users=8, max_seq_len=64, min_decode_rows=2))[0]


def _alone_and_in_a_crowd(runner):
    """Whether slot 0's decode logits are bitwise the same alone and beside 6 other users."""
    for slot in range(runner.n_slots):
        runner.prefill(slot, [1 + slot, 2, 3], 0)
    alone = runner.decode([0], [5], [3])
    crowd = runner.decode(list(range(7)), [5, 9, 8, 7, 6, 5, 4], [3] * 7)  # rewrites position 3
    return torch.equal(alone[0], crowd[0]), alone, crowd
