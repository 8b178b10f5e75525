"""The CUDA path: our model against Hugging Face on the GPU (fp32 and bf16), and the engine's
reproducibility (a request alone equals it in a changing crowd) on the GPU, bf16 and fp32.

The GPU tests are skipped where torch sees no CUDA device (CI); the CUDA section of
benchmarks/README.md says on which GPU and torch they last ran.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf
from llamaserve.config import ModelArgs
from llamaserve.engine.runner import ModelRunner, default_min_decode_rows, reads_whole_cache
from llamaserve.model.llama import Transformer
from llamaserve.weights import load_model
from llamaserve.weights.builtin import random_state_dict

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 on both sides: rounding only (TF32 is off for matmuls by default). bf16 on both sides:
# each side rounds its own intermediates to bf16 in its own order (about 1% measured on CPU for
# these models): relative error ||ours - HF|| / ||HF|| of a logits row.
FP32_ATOL = 1e-4
BF16_REL = 3e-2


def test_cuda_decode_calls_have_one_shape():
    """cuBLAS picks kernels by row count, and CUDA attention's bits follow the key length: CUDA
    decode calls cover every slot and read every key (through a spare slot); CPU ones do neither."""
    cuda = torch.device("cuda")
    for users in (1, 8, 16, 32, 40):
        assert default_min_decode_rows(cuda, users) == max(16, users)
    assert reads_whole_cache(cuda)
    assert not reads_whole_cache(torch.device("cpu"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["llama2-tied", "llama3-gqa-untied", "llama31-scaled-rope-untied"])
def test_logits_match_hf_on_cuda(tmp_path, case, dtype):
    from test_model_vs_hf import CASES, _hf_model, logits_beside_hf

    spec = CASES[case]
    args = tiny_args(spec["kind"], tied=spec["tied"])
    directory = write_hf(tmp_path / "hf", args, random_weights(args, seed=7), n_files=spec["n_files"])
    ours = load_model(directory, dtype=dtype, device="cuda", progress=False).model
    assert ours.device.type == "cuda" and ours.dtype == dtype
    hf = _hf_model(directory, dtype).to("cuda")
    prompt = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1)).cuda()
    slot = torch.tensor([2], device="cuda")
    for step, (logits, hf_logits) in enumerate(logits_beside_hf(ours, hf, prompt, slot)):
        assert logits.device.type == "cuda" and torch.isfinite(logits).all()
        if dtype == torch.float32:
            diff = (logits - hf_logits).abs().max().item()
            assert diff <= FP32_ATOL, f"{case} step {step}: max diff {diff}"
        else:
            rel = ((logits - hf_logits).norm() / hf_logits.norm()).item()
            assert rel <= BF16_REL, f"{case} step {step}: relative error {rel}"


def _cuda_model(dtype: torch.dtype, device: str | torch.device = "cuda", heads: tuple[int, int] = (2, 1)) -> Transformer:
    # Head size 128 (2 heads, dim 256; Llama 2/3's head size) or 64 (12 heads, dim 768; the
    # benchmark model's); the attention kernel torch picks, and its rounding, depend on it.
    # Weights scaled so logits are as peaked as the CPU engine tests' tiny model.
    n_heads, n_kv_heads = heads
    dim = 256 if n_heads == 2 else 768
    args = ModelArgs(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=512, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=0, std=0.25 if dim == 256 else 0.15))
    return model.eval().to(device, dtype)


# Both differed alone vs. in the crowd on an H200 when decode calls read keys in 16-key buckets.
@pytest.fixture(scope="module", params=[(torch.bfloat16, (12, 4)), (torch.float32, (2, 1))],
                ids=["bf16-head64", "fp32-head128"])
def cuda_model(request):
    dtype, heads = request.param
    return _cuda_model(dtype, heads=heads)


@needs_cuda
def test_engine_on_cuda_gives_identical_tokens_alone_and_in_a_changing_crowd(cuda_model):
    # The CPU test's own procedure (greedy, top-k, top-p, min-p + penalties, logprobs compared
    # exactly), on the GPU.
    from test_engine import test_requests_give_identical_tokens_alone_and_in_a_changing_crowd as crowd

    runner = ModelRunner(cuda_model, max_users=32, max_seq_len=64)
    assert runner.min_decode_rows == 33 and runner.padding_slot == 32 and runner.captured is not None
    crowd(cuda_model)


@needs_cuda
def test_engine_on_cuda_every_user_matches_its_solo_run(cuda_model):
    from test_engine import test_background_users_also_match_their_solo_runs as every_user

    every_user(cuda_model)


def _greedy_and_seeded(model, **config):
    """Token ids and logprobs (bitwise) of a greedy and a seeded request decoding together."""
    from engine_util import make_engine, run_to_completion

    from llamaserve.engine.request import SamplingParams

    engine = make_engine(model, max_users=8, max_seq_len=128, **config)
    engine.add_request("greedy", list(range(40, 77)), SamplingParams(max_tokens=16, temperature=0, logprobs=2,
                                                                     ignore_eos=True))
    engine.add_request("seeded", list(range(3, 12)), SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                                    seed=5, logprobs=2, ignore_eos=True))
    out = run_to_completion(engine)
    return engine, {rid: (r["token_ids"], [(lp.token_id, lp.logprob, lp.top) for lp in r["logprobs"]])
                    for rid, r in out.items()}


@needs_cuda
def test_captured_cuda_graph_decode_gives_the_eager_bits(cuda_model, monkeypatch):
    """The replayed graph launches the kernels an eager decode call does: the same bits."""
    graphed_engine, graphed = _greedy_and_seeded(cuda_model)
    assert graphed_engine.runner.captured is not None and graphed_engine.runner.captured.graph is not None
    monkeypatch.setenv("LLAMASERVE_CUDA_GRAPHS", "0")
    eager_engine, eager = _greedy_and_seeded(cuda_model)
    assert eager_engine.runner.captured is None
    assert graphed == eager


needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                               reason="needs a GPU with FP8 tensor cores and rowwise scaling (compute capability 9.0+)")
# ||fp8 - bf16|| / ||bf16|| of logits on tests/test_quant.py's GQA net (std 0.02): weights and
# activations rounded to e4m3; 7.1% against fp32 measured on CPU (tests/test_fp8.py).
FP8_VS_BF16_REL = 0.10


@needs_fp8
def test_fp8_scaled_mm_computes_what_the_cpu_emulation_computes():
    """torch._scaled_mm with rowwise scales against the emulation tests/test_fp8.py pins on CPU
    (exact e4m3 products, fp32 sums): equal up to the sums' order and the bf16 output rounding."""
    from llamaserve.weights.fp8 import emulated_mm, fp8_linear, quantize_fp8, quantize_rows, scaled_mm_applies

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1024, 512, device="cuda", generator=gen) * 0.02
    x = torch.randn(33, 512, device="cuda", generator=gen).bfloat16()
    wq, ws = quantize_fp8(w)
    assert scaled_mm_applies(x, wq)
    got = fp8_linear(x, wq, ws)
    want = emulated_mm(*quantize_rows(x), wq, ws, torch.float32)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel


@needs_fp8
def test_fp8_model_on_cuda_against_bf16_and_the_cpu_emulation():
    from llamaserve.weights.quant import quantize_model

    from test_quant import GQA, fp32_model

    bf16 = fp32_model(GQA).to("cuda", torch.bfloat16)
    fp8 = quantize_model(fp32_model(GQA).to("cuda", torch.bfloat16), "fp8")
    assert fp8.layers[0].attention.wq.weight.device.type == "cuda"
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))

    def logits(model, device):
        cache = model.new_cache(2, 64)
        z = torch.zeros(2, dtype=torch.long, device=device)
        return model(tokens.to(device), z, torch.arange(2, device=device), cache, all_logits=True).float().cpu()

    want, got = logits(bf16, "cuda"), logits(fp8, "cuda")
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < FP8_VS_BF16_REL, rel
    emulated = logits(fp8.to("cpu"), "cpu")  # the same fp8 tensors, emulated in bf16 on the CPU
    rel_emulated = ((got - emulated).norm() / emulated.norm()).item()
    assert rel_emulated < 3e-2, rel_emulated


@needs_fp8
def test_fp8_engine_on_cuda_gives_identical_tokens_alone_and_in_a_changing_crowd():
    from test_engine import test_requests_give_identical_tokens_alone_and_in_a_changing_crowd as crowd

    from llamaserve.weights.quant import quantize_model

    crowd(quantize_model(_cuda_model(torch.bfloat16, heads=(12, 4)), "fp8"))


@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 33, 128])
@pytest.mark.parametrize("shape", [(2048, 768), (1000, 520)], ids=["even", "ragged"])
def test_int8_triton_kernel_computes_the_dequantised_product(rows, shape):
    from llamaserve.weights import int8_cuda
    from llamaserve.weights.quant import quantize_tensor

    gen = torch.Generator(device="cuda").manual_seed(rows)
    out_features, in_features = shape
    q, scale = quantize_tensor(torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02)
    x = torch.randn(rows, in_features, device="cuda", generator=gen).bfloat16()
    assert int8_cuda.applies(x, q)
    got = int8_cuda.matmul(x, q, scale)
    assert got is not None and int8_cuda._kernel, "the Triton kernel did not build"
    want = x.float() @ (q.float() * scale[:, None]).t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel  # bf16 output rounding
    # A row's bits are its own: other rows' values do not change them (same row count).
    other = torch.randn(rows, in_features, device="cuda", generator=gen).bfloat16()
    other[0] = x[0]
    assert torch.equal(int8_cuda.matmul(other, q, scale)[0], got[0])


@needs_cuda
def test_int8_engine_on_cuda_gives_identical_tokens_alone_and_in_a_changing_crowd():
    from test_engine import test_requests_give_identical_tokens_alone_and_in_a_changing_crowd as crowd

    from llamaserve.weights import int8_cuda
    from llamaserve.weights.quant import quantize_model

    crowd(quantize_model(_cuda_model(torch.bfloat16, heads=(12, 4))))
    assert int8_cuda._kernel, "the int8 layers did not run on the Triton kernel"


@needs_cuda
def test_cuda_engines_sample_on_the_device_with_one_shape():
    from llamaserve.engine.sampling import Sampler
    from engine_util import make_engine

    engine = make_engine(_cuda_model(torch.bfloat16), max_users=8, max_seq_len=64)
    assert engine.sampler.device_draws is not None and engine.sampler.device_draws.rows == 8
    assert Sampler(512).device_draws is None  # the CPU keeps the host sampler


@needs_cuda
def test_device_sampler_on_cuda_alone_equals_crowd_and_follows_the_cpu():
    """The same rows on the GPU: a seeded row alone equals it in padded crowds of mixed modes,
    and draws the CPU's token for the same uniform (exp and sums may round differently: a
    boundary case now and then)."""
    import random

    from llamaserve.engine.request import SamplingParams
    from llamaserve.engine.sampling import Sampler
    from llamaserve.engine.sampling.on_device import DeviceDraws

    vocab, n = 128256, 33
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, vocab, generator=g) * 3
    rng = random.Random(2)
    kinds = [dict(temperature=0.8), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=40),
             dict(temperature=1.0, min_p=0.05), dict(temperature=0)]
    s = Sampler(vocab)
    states = [s.start(SamplingParams(seed=rng.getrandbits(64), **kinds[i % len(kinds)]), [1]) for i in range(n)]
    gpu, cpu = DeviceDraws(rows=n), DeviceDraws(rows=n)
    crowd = gpu.sample(logits.cuda(), states).tolist()
    for st in states:
        st.draws = 0
    on_cpu = cpu.sample(logits, states).tolist()
    assert sum(a != b for a, b in zip(crowd, on_cpu)) <= 1
    for i in range(n):
        states[i].draws = 0
        assert gpu.sample(logits[i : i + 1].cuda(), [states[i]]).tolist() == [crowd[i]], i
