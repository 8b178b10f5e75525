"""The KV pool's size on a GPU: a share of the device's memory, minus what is in use and an
activation reserve (engine/kv_budget.py), and the flag that sets the share."""

import argparse

import pytest
import torch

from llamaserve.engine import engine as engine_module
from llamaserve.engine.args import EngineArgs
from llamaserve.engine.kv_budget import activation_reserve_bytes, gpu_kv_budget_gib, kv_pool_blocks

GIB = 2**30


def test_budget_is_the_share_minus_what_is_in_use_and_the_reserve():
    # 80 GiB card, 20 GiB in use (weights), 2 GiB reserve, 90%: 72 - 20 - 2 = 50 GiB.
    assert gpu_kv_budget_gib(0.9, free_bytes=60 * GIB, total_bytes=80 * GIB, reserve_bytes=2 * GIB) == pytest.approx(50)
    assert gpu_kv_budget_gib(0.5, free_bytes=60 * GIB, total_bytes=80 * GIB, reserve_bytes=2 * GIB) == pytest.approx(18)


def test_no_room_left_is_an_error_that_says_what_to_change():
    with pytest.raises(ValueError, match="leaves no memory for the KV cache.*--gpu-memory-utilization.*--kv-cache-memory"):
        gpu_kv_budget_gib(0.5, free_bytes=30 * GIB, total_bytes=80 * GIB, reserve_bytes=GIB)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        gpu_kv_budget_gib(fraction, GIB, GIB, 0)


def test_reserve_grows_with_the_widest_call_and_the_vocabulary():
    small, wide = activation_reserve_bytes(32, 128256), activation_reserve_bytes(512, 128256)
    assert wide - small == 3 * (512 - 32) * 128256 * 4


def test_pool_blocks_from_gib():
    assert kv_pool_blocks(None, 100) is None
    assert kv_pool_blocks(1.0, 1024, block_size=16) == GIB // (1024 * 16)


def parse(*argv):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(list(argv)), env={})


def test_flag_reaches_the_engine_config_and_bad_values_name_the_flag():
    args = parse("--gpu-memory-utilization", "0.75")
    assert args.engine_config().gpu_memory_utilization == 0.75
    assert parse().engine_config().gpu_memory_utilization == 0.9
    with pytest.raises(ValueError, match="--gpu-memory-utilization must be a fraction"):
        parse("--gpu-memory-utilization", "1.2").validate(cli=True)


class _FakeCudaModel:
    """Only what Engine._kv_memory_gib reads: a model that says it lives on a CUDA device."""

    device = torch.device("cuda", 0)

    class args:
        vocab_size = 1000


def test_engine_sizes_the_pool_from_the_gpu_when_no_gib_is_given(monkeypatch):
    calls = []

    def fake_budget(device, fraction, reserve):
        calls.append((device, fraction, reserve))
        return 3.5

    monkeypatch.setattr(engine_module, "cuda_kv_budget_gib", fake_budget)
    engine = object.__new__(engine_module.Engine)
    engine.config = engine_module.EngineConfig(max_users=8, prefill_chunk=64, gpu_memory_utilization=0.8)
    assert engine._kv_memory_gib(_FakeCudaModel()) == 3.5
    assert calls == [(torch.device("cuda", 0), 0.8, activation_reserve_bytes(64, 1000))]
    engine.config = engine_module.EngineConfig(kv_cache_memory=2.0)
    assert engine._kv_memory_gib(_FakeCudaModel()) == 2.0  # an explicit figure wins
    assert len(calls) == 1


def test_the_reserve_covers_a_steps_prefill_chunks_in_one_call(monkeypatch):
    """With --max-prefill-tokens, one call computes several users' chunks: that many rows."""
    reserves = []
    monkeypatch.setattr(engine_module, "cuda_kv_budget_gib", lambda device, fraction, reserve: reserves.append(reserve) or 1.0)
    engine = object.__new__(engine_module.Engine)
    engine.config = engine_module.EngineConfig(max_users=8, prefill_chunk=64, max_prefill_tokens=512)
    engine._kv_memory_gib(_FakeCudaModel())
    assert reserves == [activation_reserve_bytes(512, 1000)]


def test_cpu_keeps_the_configured_pool():
    engine = object.__new__(engine_module.Engine)
    engine.config = engine_module.EngineConfig()

    class CpuModel:
        device = torch.device("cpu")

    assert engine._kv_memory_gib(CpuModel()) is None


def test_memory_the_allocator_caches_unused_counts_as_free(monkeypatch):
    """A second engine in one process (benchmarks, the CUDA tests) gets the pool the first one
    freed: torch's cache holds that memory, the device reports it in use."""
    from llamaserve.engine.kv_budget import cuda_kv_budget_gib

    # 80 GiB card: 20 GiB of weights allocated, and 50 GiB of an earlier engine's pool freed
    # into torch's cache (reserved, not allocated): the device says 10 GiB free.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 70 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * GIB)
    assert cuda_kv_budget_gib(torch.device("cuda", 0), 0.9, 2 * GIB) == pytest.approx(72 - 20 - 2)
