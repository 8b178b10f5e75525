"""The compiled decode-attention kernel: same results as RoPE + cache write + SDPA, rows that
never depend on each other, clear errors, and a plain-torch fallback when it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaserve import kernels
from llamaserve.kernels import decode_attention as kernel
from llamaserve.model.llama import apply_rope

pytestmark = pytest.mark.skipif(not kernel.available(), reason="no C++ compiler for the kernel")


def make_inputs(rows, heads, kv_heads, head_dim, max_seq_len=80, n_slots=8, seed=0, block_size=16):
    """q/k/v of a decode call and a block pool whose tables scatter each slot's blocks."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-max_seq_len // block_size)
    n_blocks = n_slots * max_blocks + 3  # a few blocks nobody's table holds
    keys = torch.randn(n_blocks, kv_heads, block_size, head_dim, generator=gen)
    values = torch.randn(n_blocks, kv_heads, block_size, head_dim, generator=gen)
    tables = torch.randperm(n_blocks, generator=gen)[: n_slots * max_blocks].view(n_slots, max_blocks).contiguous()
    # q/k/v as views into one fused projection output, like the model's.
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(rows, 1, heads, head_dim), k.view(rows, 1, kv_heads, head_dim),
            v.view(rows, 1, kv_heads, head_dim), keys, values, tables)


def contiguous(pool, tables):
    """[slots, kv_heads, max_blocks * block_size, hd]: each slot's positions in order."""
    blocks = pool[tables]  # [slots, max_blocks, kv_heads, block_size, hd]
    n_slots, max_blocks, kv_heads, block_size, hd = blocks.shape
    return blocks.transpose(1, 2).reshape(n_slots, kv_heads, max_blocks * block_size, hd)


def rotation_for(positions, head_dim):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inv_freq
    return torch.polar(torch.ones_like(angles), angles)[:, None, None, :]


def reference(q, k, v, rotation, keys, values, slots, positions):
    """keys/values: contiguous [slots, kv_heads, positions, hd], written in place."""
    q, k = apply_rope(q, rotation), apply_rope(k, rotation)
    keys[slots, :, positions] = k[:, 0]
    values[slots, :, positions] = v[:, 0]
    visible = (torch.arange(keys.shape[2])[None, :] <= positions[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[slots], values[slots], attn_mask=visible,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attend(q, k, v, rotation, slots, positions, keys, values, tables):
    rows = kernel.DecodeRows(rotation, slots, positions, tables)
    return kernel.decode_attention(q, k, v, rows, keys, values, rows.block_tables)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (12, 4, 64), (8, 2, 128), (6, 1, 32)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_rope_cache_write_and_sdpa_through_scattered_blocks(heads, kv_heads, head_dim, block_size):
    q, k, v, keys, values, tables = make_inputs(5, heads, kv_heads, head_dim, block_size=block_size)
    slots = torch.tensor([1, 0, 5, 2, 7])
    positions = torch.tensor([3, 17, 0, 40, 79])  # first and last cache position included
    rotation = rotation_for(positions, head_dim)
    ref_keys, ref_values = contiguous(keys, tables), contiguous(values, tables)
    expected = reference(q, k, v, rotation, ref_keys, ref_values, slots, positions)

    out = attend(q, k, v, rotation, slots, positions, keys, values, tables)

    torch.testing.assert_close(contiguous(keys, tables), ref_keys, rtol=0, atol=1e-6)
    assert torch.equal(contiguous(values, tables), ref_values)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


def test_where_the_blocks_sit_does_not_change_a_bit():
    heads, kv_heads, head_dim = 8, 2, 64
    q, k, v, keys, values, tables = make_inputs(3, heads, kv_heads, head_dim, seed=5)
    slots, positions = torch.tensor([0, 3, 6]), torch.tensor([79, 20, 47])
    rotation = rotation_for(positions, head_dim)
    out = attend(q, k, v, rotation, slots, positions, keys.clone(), values.clone(), tables)
    # The same contents in other blocks: every block of the pool moved, tables to match.
    moved = torch.randperm(keys.shape[0], generator=torch.Generator().manual_seed(6))
    new_keys, new_values = torch.empty_like(keys), torch.empty_like(values)
    new_keys[moved], new_values[moved] = keys, values
    assert torch.equal(attend(q, k, v, rotation, slots, positions, new_keys, new_values, moved[tables].contiguous()), out)


def test_a_row_has_the_same_bits_whatever_the_other_rows():
    heads, kv_heads, head_dim = 12, 4, 64
    q, k, v, keys, values, tables = make_inputs(9, heads, kv_heads, head_dim, n_slots=9, seed=1)
    positions = torch.tensor([33, 5, 70, 0, 16, 15, 64, 47, 9])
    slots = torch.arange(9)
    rotation = rotation_for(positions, head_dim)
    batched = attend(q, k, v, rotation, slots, positions, keys.clone(), values.clone(), tables)
    for row in range(9):
        pick = slice(row, row + 1)
        alone = attend(q[pick], k[pick], v[pick], rotation[pick], slots[pick], positions[pick], keys.clone(),
                       values.clone(), tables)
        assert torch.equal(alone, batched[pick]), f"row {row} changed with its neighbours"


def test_rows_of_one_sequence_see_each_others_keys_as_causal_attention_and_as_one_at_a_time():
    """A prefill chunk: consecutive positions of one slot in one call. Every key is written before
    any row attends (the last row sees the first row's key), the result is causal attention, and
    each row has the bits it gets fed alone, in order (a decode step, or a chunk cut elsewhere)."""
    heads, kv_heads, head_dim, n = 8, 2, 64, 40
    q, k, v, keys, values, tables = make_inputs(n, heads, kv_heads, head_dim, seed=3)
    slots = torch.full((n,), 2)
    positions = torch.arange(n) + 7  # 7 earlier keys already cached
    rotation = rotation_for(positions, head_dim)
    ref_keys, ref_values = contiguous(keys, tables), contiguous(values, tables)
    expected = reference(q, k, v, rotation, ref_keys, ref_values, slots, positions)

    together = attend(q, k, v, rotation, slots, positions, keys.clone(), values.clone(), tables)
    torch.testing.assert_close(together, expected, rtol=0, atol=2e-6)

    one_keys, one_values = keys.clone(), values.clone()
    for cut in ((0, 1), (1, 17), (17, 18), (18, n)):
        part = slice(*cut)
        out = attend(q[part], k[part], v[part], rotation[part], slots[part], positions[part], one_keys, one_values,
                     tables)
        assert torch.equal(out, together[part]), f"rows {cut} changed with the chunk they came in"


def test_thread_count_does_not_change_a_bit():
    q, k, v, keys, values, tables = make_inputs(6, 8, 2, 64, seed=2)
    positions, slots = torch.tensor([10, 70, 3, 41, 0, 66]), torch.tensor([5, 4, 3, 2, 1, 0])
    rotation = rotation_for(positions, 64)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(attend(q, k, v, rotation, slots, positions, keys.clone(), values.clone(), tables))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_bad_arguments_get_a_clear_error():
    q, k, v, keys, values, tables = make_inputs(1, 4, 4, 16, max_seq_len=16)
    rotation = rotation_for(torch.tensor([8]), 16)
    with pytest.raises(ValueError, match="positions and blocks inside the cache"):
        attend(q, k, v, rotation, torch.tensor([0]), torch.tensor([16]), keys, values, tables)
    with pytest.raises(ValueError, match="slots, positions"):
        attend(q, k, v, rotation, torch.tensor([8]), torch.tensor([1]), keys, values, tables)
    with pytest.raises(ValueError, match="blocks inside the cache"):
        attend(q, k, v, rotation, torch.tensor([0]), torch.tensor([1]), keys, values, tables + keys.shape[0])
    with pytest.raises(ValueError, match="block size a multiple of 16"):
        attend(q, k, v, rotation, torch.tensor([0]), torch.tensor([1]), keys[:, :, :8].contiguous(),
               values[:, :, :8].contiguous(), tables)
    with pytest.raises(ValueError, match="contiguous"):
        attend(q, k, v, rotation, torch.tensor([0]), torch.tensor([1]), keys.transpose(2, 3), values, tables)


def test_head_sizes_the_kernel_cannot_take_stay_on_torch():
    cpu = torch.device("cpu")
    assert kernel.supports((1, 1, 4, 16), torch.float32, cpu)
    assert not kernel.supports((1, 1, 4, 24), torch.float32, cpu)  # not a multiple of 16
    assert not kernel.supports((1, 1, 4, 512), torch.float32, cpu)  # over MAX_HEAD_DIM
    assert not kernel.supports((1, 2, 4, 16), torch.float32, cpu)  # prefill: two tokens
    assert not kernel.supports((1, 1, 4, 16), torch.float64, cpu)


@pytest.fixture
def fresh_kernel_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMASERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    return tmp_path


def test_switched_off_by_environment(fresh_kernel_registry, monkeypatch):
    monkeypatch.setenv("LLAMASERVE_KERNELS", "0")
    assert kernels.load("decode_attention") is None
    assert not kernel.supports((1, 1, 4, 16), torch.float32, torch.device("cpu"))


def test_a_failed_build_falls_back_with_a_warning(fresh_kernel_registry, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert kernels.load("decode_attention") is None
    assert "kernel decode_attention is off" in caplog.text
    assert not list(fresh_kernel_registry.iterdir()), "a failed build must leave nothing behind"


def test_a_build_is_cached_by_content(fresh_kernel_registry):
    assert kernels.load("decode_attention") is not None
    built = list(fresh_kernel_registry.glob("decode_attention-*.so"))
    assert len(built) == 1
    kernels._loaded.clear()
    stamp = built[0].stat().st_mtime_ns
    assert kernels.load("decode_attention") is not None
    assert built[0].stat().st_mtime_ns == stamp, "a cached build was rebuilt"


@pytest.mark.parametrize("ffn_width", [96, 40], ids=["swiglu-kernel", "width-not-a-multiple-of-16"])
def test_model_decode_on_kernels_matches_plain_torch(ffn_width):
    from llamaserve.config import ModelArgs
    from llamaserve.model.llama import Transformer
    from llamaserve.weights.builtin import random_state_dict

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, explicit_hidden_dim=ffn_width)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3))
    model.eval().pack_weights()
    assert model.decode_kernels_fit()

    def decode_logits():
        cache = model.new_cache(4, 64)
        model(torch.arange(1, 21).view(2, 10), torch.tensor([0, 0]), torch.tensor([2, 0]), cache)
        return model(torch.tensor([[5], [7]]), torch.tensor([10, 10]), torch.tensor([2, 0]), cache)

    whole_step = model._whole_step_args() is not None
    assert whole_step == (ffn_width % 16 == 0)  # the SwiGLU kernel's widths
    on_kernels = decode_logits()
    # The all-layers op and the per-layer calls run the same kernels and matmuls: the same bits.
    model._whole_step = (None,)
    assert torch.equal(decode_logits(), on_kernels)
    model.decode_kernels_fit = lambda: False
    torch.testing.assert_close(on_kernels, decode_logits(), rtol=0, atol=1e-5)


def test_without_a_compiler_decode_runs_on_torch(tmp_path):
    # A fresh process (torch ops, once registered, stay for the process), every build failing.
    import os
    import subprocess
    import sys

    script = """
import torch
from llamaserve.config import ModelArgs
from llamaserve.model.llama import Transformer
from llamaserve.weights.builtin import random_state_dict
args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
model = Transformer(args)
model.load_state_dict(random_state_dict(args, seed=4))
model.eval().pack_weights()
model.prepare_decode()
assert model._whole_step_args() is None and not model.decode_kernels_fit()
cache = model.new_cache(2, 32)
model(torch.arange(1, 9).view(1, 8), torch.tensor([0]), torch.tensor([0]), cache)
print(tuple(model(torch.tensor([[3]]), torch.tensor([8]), torch.tensor([0]), cache).shape))
"""
    env = {**os.environ, "CXX": "false", "LLAMASERVE_KERNEL_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 256)"
    assert "is off" in result.stderr  # said once, as a warning
    assert not list(tmp_path.iterdir())


def test_the_runner_builds_the_decode_kernels_at_start(fresh_kernel_registry):
    from llamaserve.config import ModelArgs
    from llamaserve.engine.runner import ModelRunner
    from llamaserve.model.llama import Transformer
    from llamaserve.weights.builtin import random_state_dict

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=5))
    ModelRunner(model.eval(), max_users=2, max_seq_len=32)  # no request yet
    built = {path.name.split("-")[0] for path in fresh_kernel_registry.glob("*.so")}
    assert {"decode_attention", "pointwise"} <= built
    # The all-layers op registers torch ops, which a process loads once (as it did here, or in an
    # earlier test of this process): ready before any request either way.
    assert "ops:decode_layers" in kernels._loaded and model._whole_step_args() is not None


def test_the_sampler_builds_its_kernel_at_start(fresh_kernel_registry):
    from llamaserve.engine.sampling import Sampler

    Sampler(256)
    assert list(fresh_kernel_registry.glob("sampling-*.so"))
