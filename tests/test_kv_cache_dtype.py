"""What the KV cache stores (--kv-cache-dtype). The bf16 cache of bf16 / quantised CPU models
(kernels/decode_attention.cpp, "bf16 cache"): half the bytes of an fp32 cache, attention through
`vdpbf16ps`, and the engine's guarantees kept (a row's bits do not depend on the batch, nor on
where a prompt is cut into chunks). The fp8 (e4m3) cache for GPUs, on the torch path."""

import math

import pytest
import torch
from engine_util import make_engine, one_thread, run_to_completion
from engine_util import random_tokens as tokens

from llamaserve.config import ModelArgs
from llamaserve.engine.args import EngineArgs
from llamaserve.engine.request import SamplingParams
from llamaserve.engine.runner import ModelRunner
from llamaserve.kernels import decode_attention as kernel
from llamaserve.kernels import qmatmul
from llamaserve.model.kv_cache import FP8_MAX, apply_kv_cache_dtype, to_cache
from llamaserve.model.llama import Transformer
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.quant import quantize_model

needs_bf16_cache = pytest.mark.skipif(not (kernel.bf16_cache_available(64) and qmatmul.available()),
                                      reason="the attention kernel takes a bf16 cache only with AVX512-BF16")
_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def wide_head_model(precision: str = "bf16", head_dim: int = 32, std: float = 0.5, kv_dtype: str = "auto"):
    """A tiny Llama whose heads are wide enough for the bf16 cache (head_dim a multiple of 32)."""
    heads = 128 // head_dim
    args = ModelArgs(dim=128, n_layers=2, n_heads=heads, n_kv_heads=max(1, heads // 2), vocab_size=512, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 0, std))
    model = model.eval()
    model = model.to(torch.bfloat16) if precision == "bf16" else quantize_model(model.to(torch.bfloat16), precision)
    apply_kv_cache_dtype(model, kv_dtype)
    return model


# ---- the kernel ------------------------------------------------------------------------------

def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, round_weights: bool = True) -> torch.Tensor:
    """One query [hd] over keys/values [n, hd]: the bf16 cache's arithmetic in float64 (query and
    weights rounded to bf16, weights divided by their rounded sum)."""
    qb = q.to(torch.bfloat16).double()
    scores = (keys.double() @ qb).float() / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.max())
    if round_weights:
        weights = weights.to(torch.bfloat16).float()
    return (weights.double() @ values.double() / weights.double().sum()).float()


def kernel_case(head_dim: int, heads: int, kv_heads: int, positions: list[int], seed: int = 0):
    """Rows at `positions` of their own slots (each a sequence with random history), one call."""
    g = torch.Generator().manual_seed(seed)
    rows, per_slot = len(positions), max(positions) // 16 + 1
    shape = (rows * per_slot + 1, kv_heads, 16, head_dim)
    key_cache = torch.randn(shape, generator=g).to(torch.bfloat16)
    value_cache = torch.randn(shape, generator=g).to(torch.bfloat16)
    tables = torch.cat([torch.arange(1, 1 + rows * per_slot).view(rows, per_slot),
                        torch.zeros(1, per_slot, dtype=torch.long)])
    q = torch.randn(rows, 1, heads, head_dim, generator=g)
    k = torch.randn(rows, 1, kv_heads, head_dim, generator=g)
    v = torch.randn(rows, 1, kv_heads, head_dim, generator=g)
    rotation = torch.polar(torch.ones(rows, 1, 1, head_dim // 2), torch.zeros(rows, 1, 1, head_dim // 2))  # none
    rows_spec = kernel.DecodeRows(rotation, torch.arange(rows), torch.tensor(positions), tables)
    out = kernel.decode_attention(q, k, v, rows_spec, key_cache, value_cache, rows_spec.block_tables)
    return q, k, v, out, tables, key_cache, value_cache


@needs_bf16_cache
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(32, 4, 4), (64, 12, 4), (128, 8, 1), (96, 2, 2), (256, 4, 2)])
def test_kernel_equals_the_rounded_reference_and_stores_rounded_keys_and_values(head_dim, heads, kv_heads):
    positions = [0, 5, 15, 16, 33, 100, 127]  # inside a block, at block edges, odd and even counts
    q, k, v, out, tables, key_cache, value_cache = kernel_case(head_dim, heads, kv_heads, positions)
    keys_rows, values_rows = kernel.bf16_blocks_as_rows(key_cache, value_cache)
    group = heads // kv_heads
    worst = worst_unrounded = 0.0
    for r, pos in enumerate(positions):
        blocks = tables[r]
        seen_keys = keys_rows[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, : pos + 1].float()
        seen_values = values_rows[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, : pos + 1].float()
        # The row's own key and value went in rounded to bf16 (no rotation here), at its position.
        assert torch.equal(seen_keys[:, pos], k[r, 0].to(torch.bfloat16).float())
        assert torch.equal(seen_values[:, pos], v[r, 0].to(torch.bfloat16).float())
        for h in range(heads):
            expected = reference(q[r, 0, h], seen_keys[h // group], seen_values[h // group])
            scale = expected.abs().max()
            worst = max(worst, float((out[r, 0, h] - expected).abs().max() / scale))
            unrounded = reference(q[r, 0, h], seen_keys[h // group], seen_values[h // group], round_weights=False)
            worst_unrounded = max(worst_unrounded, float((out[r, 0, h] - unrounded).abs().max() / scale))
    assert worst < 2e-6  # fp32 sums in another order (measured 1.8e-7 to 2.5e-7)
    assert worst_unrounded > 100 * worst  # the tolerance tells rounded weights from unrounded ones


@needs_bf16_cache
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (12, 4), (8, 2), (8, 1)])
def test_rows_of_a_prompt_chunk_have_the_bits_they_have_one_at_a_time(heads, kv_heads):
    """A chunk's rows attend to each other's keys; each row's result equals the same row computed
    alone after the rows before it (decode, one-token chunks), whatever the group of queries."""
    head_dim, n, start = 64, 37, 21
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n, 1, heads, head_dim, generator=g)
    k = torch.randn(n, 1, kv_heads, head_dim, generator=g)
    v = torch.randn(n, 1, kv_heads, head_dim, generator=g)
    angles = torch.arange(start, start + n).float()[:, None, None, None] * torch.linspace(0.01, 1, head_dim // 2)
    rotation = torch.polar(torch.ones_like(angles), angles)
    blocks = (start + n) // 16 + 1
    tables = torch.cat([torch.arange(1, 1 + 2 * blocks).view(2, blocks), torch.zeros(1, blocks, dtype=torch.long)])
    history = torch.randn(blocks, kv_heads, 16, head_dim, generator=g).to(torch.bfloat16)
    caches = []
    for _ in range(2):
        key_cache = torch.zeros(2 * blocks + 1, kv_heads, 16, head_dim, dtype=torch.bfloat16)
        value_cache = torch.zeros_like(key_cache)
        key_cache[1 : 1 + blocks] = history  # slot 0's first `start` positions: a cached prefix
        value_cache[1 : 1 + blocks] = history.flip(-1)
        caches.append((key_cache, value_cache))
    positions = torch.arange(start, start + n)
    together = kernel.decode_attention(q, k, v, kernel.DecodeRows(rotation, torch.zeros(n, dtype=torch.long), positions, tables),
                                       *caches[0], tables)
    alone = []
    for i in range(n):
        rows = kernel.DecodeRows(rotation[i : i + 1], torch.zeros(1, dtype=torch.long), positions[i : i + 1], tables)
        alone.append(kernel.decode_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], rows, *caches[1], tables))
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@needs_bf16_cache
def test_kernel_refuses_a_bf16_cache_it_cannot_lay_out():
    rows = kernel.DecodeRows(torch.polar(torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8)), torch.tensor([0]),
                             torch.tensor([3]), torch.tensor([[1], [0]]))
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    cache = torch.zeros(2, 2, 16, 16, dtype=torch.bfloat16)  # head_dim 16: not a multiple of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.decode_attention(q, k, k, rows, cache, cache.clone(), rows.block_tables)
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    cache = torch.zeros(2, 2, 32, 32, dtype=torch.bfloat16)  # blocks of 32 positions: not the layout's 16
    with pytest.raises(ValueError, match="exactly 16"):
        kernel.decode_attention(q, k, k, rows, cache, cache.clone(), rows.block_tables)


# ---- which cache a model gets -----------------------------------------------------------------

@needs_bf16_cache
@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_bf16_and_quantised_cpu_models_get_a_bf16_cache_of_half_the_bytes(precision):
    model = wide_head_model(precision)
    assert model.kv_cache_dtype() == torch.bfloat16
    per_token = model.kv_bytes_per_token()
    runner = ModelRunner(model, 2, 64)  # packs: the choice stays the same afterwards
    assert model.dtype == torch.float32 and model.kv_cache_dtype() == torch.bfloat16
    assert runner.cache.keys[0].dtype == torch.bfloat16 and runner.cache.kernel_layout
    assert model.kv_bytes_per_token() == per_token
    full = wide_head_model(precision, kv_dtype="float32")
    assert full.kv_cache_dtype() == torch.float32 and full.kv_bytes_per_token() == 2 * per_token
    assert not ModelRunner(full, 2, 64).cache.kernel_layout


def test_fp32_models_and_narrow_heads_keep_an_fp32_cache():
    fp32 = Transformer(ModelArgs(dim=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=32))
    assert fp32.kv_cache_dtype() == torch.float32
    narrow = wide_head_model("bf16", head_dim=16)  # the bf16 layout needs head_dim a multiple of 32
    if qmatmul.available():
        assert narrow.kv_cache_dtype() == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        apply_kv_cache_dtype(narrow, "float8")


def test_the_flag_is_checked_and_travels_to_every_rank():
    assert EngineArgs(kv_cache_dtype="bfloat16").load_spec().kv_cache_dtype == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
        EngineArgs(kv_cache_dtype="fp4").validate()


@needs_bf16_cache
def test_the_pool_fits_the_memory_budget_in_the_bytes_the_cache_really_takes():
    """The engine sizes the pool before the runner packs the weights; the cache it then makes
    must take the bytes per token it was sized with (once, bf16 weights were counted at 2 bytes
    before packing and their fp32 cache made at 4: twice the budget)."""
    for kv_dtype in ("auto", "float32"):
        engine = make_engine(wide_head_model("bf16", kv_dtype=kv_dtype), kv_cache_memory=0.001)
        cache = engine.runner.cache
        assert 0.9 * 2**30 * 0.001 <= cache.num_blocks * 16 * engine.kv_bytes_per_token <= 0.001 * 2**30
        assert cache.nbytes() == (cache.num_blocks + 1) * 16 * engine.kv_bytes_per_token  # + the null block
        assert engine.stats()["kv_cache_dtype"] == {"auto": "bfloat16", "float32": "float32"}[kv_dtype]  # /status


# ---- the model and the engine with a bf16 cache ------------------------------------------------

@needs_bf16_cache
def test_logits_stay_close_to_the_fp32_cache():
    """Rounding keys, values, queries and weights to bf16 costs little on a model initialised as
    usual (std 0.02)."""
    prompt = torch.tensor([tokens(60, seed=3)])
    logits = {}
    for kv_dtype in ("auto", "float32"):
        model = wide_head_model("bf16", head_dim=64, std=0.02, kv_dtype=kv_dtype)
        runner = ModelRunner(model, 1, 64)
        logits[kv_dtype] = runner.prefill(0, prompt[0].tolist(), 0, all_logits=True)
    error = float((logits["auto"] - logits["float32"]).norm() / logits["float32"].norm())
    assert 0 < error < 0.01  # measured 0.3% (bf16 weights against fp32: 0.4%)


@needs_bf16_cache
def test_the_torch_path_reads_a_bf16_cache_within_rounding_and_refuses_the_kernel_layout():
    prompt = tokens(40, seed=4)
    on_kernels = wide_head_model("bf16", head_dim=64, std=0.02)
    runner = ModelRunner(on_kernels, 1, 64)
    expected = runner.prefill(0, prompt, 0, all_logits=True)
    on_torch = wide_head_model("bf16", head_dim=64, std=0.02)
    on_torch.decode_kernels_fit = lambda: False  # LLAMASERVE_KERNELS=0
    torch_runner = ModelRunner(on_torch, 1, 64)
    assert torch_runner.cache.keys[0].dtype == torch.bfloat16 and not torch_runner.cache.kernel_layout
    got = torch_runner.prefill(0, prompt, 0, all_logits=True)
    assert float((got - expected).norm() / expected.norm()) < 0.01  # measured 0.3%: no rounded queries or weights there
    on_kernels.decode_kernels_fit = lambda: False
    with pytest.raises(ValueError, match="kernel's bf16 layout"):
        runner.prefill(0, prompt, 0)


@needs_bf16_cache
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_a_prompt_cut_anywhere_has_the_same_cache_and_logits(precision):
    model = wide_head_model(precision)
    prompt = tokens(150, seed=0)
    runner = ModelRunner(model, 4, 256)
    per_slot = runner.cache.tables.max_blocks

    def prefill(slot, cuts):
        for a, b in zip(cuts, cuts[1:]):
            logits = runner.prefill(slot, prompt[a:b], a)
        first = 1 + slot * per_slot
        return logits, [pool[first : first + 150 // 16] for pool in runner.cache.keys + runner.cache.values]

    reference, reference_blocks = prefill(0, [0, 64, 128, 150])
    for slot, cuts in enumerate([[0, 1, 2, 50, 149, 150], [0, 150], [0, 17, 33, 150]], start=1):
        logits, blocks = prefill(slot, cuts)
        assert torch.equal(logits, reference), cuts
        assert all(torch.equal(a, b) for a, b in zip(blocks, reference_blocks)), cuts


@needs_bf16_cache
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_alone_equals_crowd_and_a_cached_prefix_equals_a_computed_one(precision):
    model = wide_head_model(precision)
    system = tokens(70, seed=9)
    probes = {
        "greedy": (system + tokens(9, seed=1), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)),
        "seeded": (system + tokens(23, seed=2), SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                                                               ignore_eos=True, logprobs=2)),
    }

    def run(crowd: int, prefix_cache: bool) -> dict:
        engine = make_engine(model, max_users=8, max_seq_len=160, prefill_chunk=32, prefix_cache=prefix_cache)
        assert engine.runner.cache.kernel_layout
        for i in range(crowd):
            engine.add_request(f"bg{i}", system + tokens(5 + 7 * i, seed=100 + i),
                               SamplingParams(max_tokens=4 + i, temperature=1.0, seed=i, ignore_eos=True))
        for rid, (prompt, params) in probes.items():
            engine.add_request(rid, prompt, params)
        out = run_to_completion(engine)
        return {rid: (out[rid]["token_ids"], [(lp.token_id, lp.logprob, lp.top) for lp in out[rid]["logprobs"]])
                for rid in probes}, engine

    alone, _ = run(0, prefix_cache=False)
    crowd, engine = run(6, prefix_cache=True)
    assert engine.scheduler.counters["prefix_cache_hits"] >= 2 * 64  # the probes took the system prompt from the cache
    assert crowd == alone


# ---- the fp8 cache (GPUs; the torch path) ------------------------------------------------------

def fp8_cache_model(kv_dtype: str = "fp8"):
    model = wide_head_model("bf16", head_dim=32, std=0.02, kv_dtype=kv_dtype).float()
    model.decode_kernels_fit = lambda: False  # as on a GPU: the torch path
    return model


def test_fp8_keeps_keys_and_values_inside_its_range():
    x = torch.tensor([1e6, -1e6, 300.0, 0.0123])
    stored = to_cache(x, torch.float8_e4m3fn).float()
    assert stored.tolist()[:2] == [FP8_MAX, -FP8_MAX] and not stored.isnan().any()
    assert stored[2] == 288.0 and abs(float(stored[3]) - 0.0123) < 0.0123 / 8  # e4m3: 3 mantissa bits


def test_an_fp8_cache_takes_a_byte_a_number_and_stays_close_to_fp32():
    prompt = tokens(50, seed=5)
    model, reference = fp8_cache_model(), fp8_cache_model("float32")
    assert model.kv_bytes_per_token() * 4 == reference.kv_bytes_per_token()
    runner = ModelRunner(model, 1, 64)
    assert runner.cache.keys[0].dtype == torch.float8_e4m3fn
    got = runner.prefill(0, prompt, 0, all_logits=True)
    expected = ModelRunner(reference, 1, 64).prefill(0, prompt, 0, all_logits=True)
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < 0.05  # measured 2.6% (e4m3 keeps 3 mantissa bits; no scales)


def test_an_fp8_cache_keeps_alone_equal_to_crowd():
    model = fp8_cache_model()
    probe = (tokens(30, seed=6), SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, logprobs=1))

    def run(crowd: int):
        engine = make_engine(model, max_users=6, max_seq_len=96, prefill_chunk=16)
        for i in range(crowd):
            engine.add_request(f"bg{i}", tokens(3 + 9 * i, seed=50 + i),
                               SamplingParams(max_tokens=3 + i, temperature=1.0, seed=i, ignore_eos=True))
        engine.add_request("probe", *probe)
        out = run_to_completion(engine)["probe"]
        return out["token_ids"], [(lp.token_id, lp.logprob) for lp in out["logprobs"]]

    assert run(0) == run(4)
