"""Tensor parallelism over torch.distributed (gloo, several processes on this machine).

TP 2 reads a 2-shard Meta checkpoint, TP 4 a Hugging Face one with 2 KV heads (fewer KV heads
than ranks: each rank keeps the KV head its query heads use). Logits must match one process
within 1e-4 and greedy outputs must be identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf, write_meta
from engine_util import ByteTokenizer, run_to_completion
from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.engine.request import SamplingParams
from llamaserve.kernels import decode_attention, qmatmul
from llamaserve.parallel import LeaderModel, LoadSpec, TensorParallelError, load_parallel_model
from llamaserve.weights import load_model

pytestmark = pytest.mark.slow

# 8 query heads, 2 KV heads; FFN width 192 and vocab 512 split evenly over 4 ranks.
ARGS = tiny_args("llama3", n_heads=8, n_kv_heads=2, ffn_dim_multiplier=None, small_vocab=True)


@pytest.fixture(autouse=True)
def keep_thread_count():
    # Rank 0 shares the cores with its followers and lowers its torch threads; later tests in
    # this pytest process should not inherit that.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    sd = random_weights(ARGS, seed=5)
    return {"meta": write_meta(root / "meta", ARGS, sd, n_shards=2), "hf": write_hf(root / "hf", ARGS, sd, n_files=2)}


@pytest.fixture(scope="module")
def groups(checkpoints):
    """(reference single-process model, {tp size: rank-0 LeaderModel})."""
    ref = load_model(checkpoints["meta"], progress=False).model
    threads = torch.get_num_threads()
    leaders = {
        2: load_parallel_model(LoadSpec(source=str(checkpoints["meta"])), 2, progress=False).model,
        4: load_parallel_model(LoadSpec(source=str(checkpoints["hf"]), threads=1), 4, progress=False).model,
    }
    torch.set_num_threads(threads)  # (module scope: the autouse fixture does not cover this)
    yield ref, leaders
    for leader in leaders.values():
        leader.close()


def batch_logits(model):
    """Prefill of two users (all positions), then one batched decode step at different positions."""
    cache = model.new_cache(3, 64)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, ARGS.vocab_size, (1, 19), generator=g)
    b = torch.randint(0, ARGS.vocab_size, (1, 7), generator=g)
    z = torch.zeros(1, dtype=torch.long)
    la = model(a, z, z, cache, all_logits=True)
    lb = model(b, z, z + 2, cache, all_logits=True)
    step = model(torch.tensor([[3], [4]]), torch.tensor([19, 7]), torch.tensor([0, 2]), cache)
    return torch.cat([la[0], lb[0], step])


@pytest.mark.parametrize("size", [2, 4])
def test_logits_match_single_process(groups, size):
    ref, leaders = groups
    leader = leaders[size]
    assert leader.tp.size == size
    assert leader.layers[0].attention.n_heads == 8 // size
    assert leader.layers[0].attention.n_kv_heads == max(1, 2 // size)
    want, got = batch_logits(ref), batch_logits(leader)
    assert got.shape == want.shape == (19 + 7 + 2, ARGS.vocab_size)
    assert float((got - want).abs().max()) < 1e-4


def greedy_engine_run(model):
    """Three greedy requests of 10 tokens on a 4-user engine: ({request: token ids}, its runner)."""
    prompts = {"a": [1, 2, 3, 4, 5], "b": list(range(40, 77)), "c": [300, 9]}
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = Engine(model, ByteTokenizer(ARGS.vocab_size), EngineConfig(max_users=4, max_seq_len=128, prefill_chunk=16))
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    return {rid: r["token_ids"] for rid, r in run_to_completion(engine).items()}, engine.runner


@pytest.mark.parametrize("size", [2, 4])
def test_greedy_engine_outputs_identical(groups, size):
    ref, leaders = groups
    (want, _), (got, _) = greedy_engine_run(ref), greedy_engine_run(leaders[size])
    assert all(len(v) == 10 for v in want.values())
    assert got == want


def test_captured_decode_steps_run_on_every_rank(groups, monkeypatch):
    """On CUDA the runner's decode steps replay captured graphs; with tensor parallelism rank 0
    has every rank capture, then replay, its own shard's step (MirroredDecode, OP_DECODE_STEP).
    Off CUDA every rank runs the step on its static buffers, which is what this checks: a
    follower that skipped a step would leave rank 0's collectives waiting, one that ran other
    tokens, positions or block tables would change the sums and the tokens."""
    from llamaserve.engine import runner
    from llamaserve.parallel.leader import MirroredDecode

    ref, leaders = groups
    monkeypatch.setattr(runner, "reads_whole_cache", lambda device: True)  # one shape, as on CUDA
    monkeypatch.setattr(runner, "graphs_apply", lambda model, fixed_shape: fixed_shape)
    steps = []
    original = MirroredDecode.__call__
    monkeypatch.setattr(MirroredDecode, "__call__", lambda self, *a: steps.append(self.rows) or original(self, *a))
    want, ref_runner = greedy_engine_run(ref)
    got, leader_runner = greedy_engine_run(leaders[2])
    assert type(ref_runner.captured).__name__ == "CapturedDecode" and isinstance(leader_runner.captured, MirroredDecode)
    assert len(steps) >= 9 and set(steps) == {5}  # 4 slots + the last-position row, every step
    assert all(len(v) == 10 for v in want.values()) and got == want
    # The group still serves ordinary calls after the mirrored steps.
    assert float((batch_logits(leaders[2]) - batch_logits(ref)).abs().max()) < 1e-4


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("int4", 0.35), ("fp8", 0.15)])  # int4 on this random net: 27%
def test_quantized_and_cache_per_rank(checkpoints, tmp_path, mode, tolerance):
    from llamaserve.weights.cache import list_entries
    from llamaserve.weights.quant import QuantLinear

    spec = LoadSpec(source=str(checkpoints["meta"]), quantize=mode, cache_root=str(tmp_path))
    ref = load_model(checkpoints["meta"], progress=False).model
    want = batch_logits(ref)
    # Every rank converts its own slice into the cache (cache hits are tested in test_cache.py).
    leader = load_parallel_model(spec, 2, progress=False).model
    try:
        assert isinstance(leader.layers[0].attention.wq, QuantLinear)
        assert leader.layers[0].attention.wq.mode == mode
        got = batch_logits(leader)
    finally:
        leader.close()
    assert float((got - want).norm() / want.norm()) < tolerance
    names = sorted(e.name for e in list_entries(tmp_path))
    assert len(names) == 2 and f"{mode}-tp2r0" in names[0] and f"{mode}-tp2r1" in names[1]


def test_the_kv_cache_dtype_reaches_every_rank(checkpoints):
    """--kv-cache-dtype travels in the LoadSpec: each rank's cache holds its heads as asked. A
    follower left at fp32 would put its heads' fp32 attention into the sum (about 2% off here)."""
    from llamaserve.model.kv_cache import apply_kv_cache_dtype

    ref = load_model(checkpoints["meta"], progress=False).model
    exact = batch_logits(ref)
    apply_kv_cache_dtype(ref, "fp8")
    want = batch_logits(ref)
    leader = load_parallel_model(LoadSpec(source=str(checkpoints["meta"]), kv_cache_dtype="fp8"), 2,
                                 progress=False).model
    try:
        assert leader.kv_cache_dtype() == torch.float8_e4m3fn
        got = batch_logits(leader)
    finally:
        leader.close()
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert float((want - exact).norm() / exact.norm()) > 1e-3


@pytest.mark.skipif(not (decode_attention.bf16_cache_available(64) and qmatmul.available()),
                    reason="the bf16 cache needs AVX512-BF16 and the CPU kernels")
def test_bf16_weights_with_the_bf16_cache_split_over_ranks(tmp_path):
    """Heads of 64 in bf16: every rank runs its heads on the kernel with a bf16 cache in the
    kernel's layout; the split changes only the order of the row-parallel sums."""
    args = tiny_args("llama3", dim=256, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None, small_vocab=True)
    source = write_meta(tmp_path / "wide", args, random_weights(args, seed=8), n_shards=2)
    ref = load_model(source, dtype=torch.bfloat16, progress=False).model
    ref.pack_weights()
    assert ref.kv_cache_dtype() == torch.bfloat16
    want = batch_logits(ref)
    leader = load_parallel_model(LoadSpec(source=str(source), dtype="bfloat16"), 2, progress=False).model
    try:
        assert leader.kv_cache_dtype() == torch.bfloat16 and leader.decode_kernels_fit()
        got = batch_logits(leader)
    finally:
        leader.close()
    assert float((got - want).norm() / want.norm()) < 1e-2  # measured 0.08%


def test_killed_rank_fails_the_model_cleanly(checkpoints):
    leader = load_parallel_model(LoadSpec(source=str(checkpoints["meta"])), 2, progress=False).model
    try:
        cache = leader.new_cache(1, 16)
        z = torch.zeros(1, dtype=torch.long)
        leader(torch.tensor([[1, 2]]), z, z, cache)
        follower = leader.processes[0]
        follower.send_signal(signal.SIGKILL)
        follower.wait(10)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            leader(torch.tensor([[3]]), z + 2, z, cache)
        assert time.monotonic() - t0 < 30
        with pytest.raises(TensorParallelError):  # and it stays failed
            leader.new_cache(1, 16)
    finally:
        leader.close(timeout=2)


_ORPHAN = textwrap.dedent(
    """
    import os, signal, sys
    from llamaserve.parallel import LoadSpec, load_parallel_model
    leader = load_parallel_model(LoadSpec(source=sys.argv[1], threads=1), 2, progress=False).model
    print(" ".join(str(p.pid) for p in leader.processes), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_followers_exit_when_rank0_dies(checkpoints):
    proc = subprocess.run([sys.executable, "-c", _ORPHAN, str(checkpoints["meta"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_bad_sizes_are_rejected(checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel must be >= 2"):
        load_parallel_model(LoadSpec(source=str(checkpoints["meta"])), 1)
    # Checked before any rank starts: no process is left behind.
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match=r"cannot split the model over 3 tensor-parallel ranks: n_heads 8, vocab_size 512, n_kv_heads 2 not"):
        load_parallel_model(LoadSpec(source=str(checkpoints["meta"]), threads=1), 3, progress=False)
    assert set(psutil.Process().children(recursive=True)) == before


# ---- through the Python API, `generate` and `serve` ------------------------------------------
# A Llama-3-vocab model (so the real tokenizer's ids fit) with dim 64: quick to load in every
# process, unlike the built-in model's random weights which each rank would have to generate.

CHAT = "Tell me about tensor parallelism."
N_TOKENS = 8


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    args = tiny_args("llama3")
    return write_hf(tmp_path_factory.mktemp("tp_vocab") / "hf", args, random_weights(args, seed=11))


@pytest.fixture(scope="module")
def reference(vocab_model):
    """Single-process greedy outputs: the chat prompt, and a text + an ids prompt."""
    from llamaserve.llm import LLM, SamplingParams

    llm = LLM(str(vocab_model), max_users=4, max_seq_len=128, progress=False)
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    chat = llm.chat([[{"role": "user", "content": CHAT}]], params)[0]
    plain = [o.token_ids for o in llm.generate(["Hello there", list(range(1000, 1030))], params)]
    return {"chat_ids": chat.token_ids, "chat_text": chat.text, "plain": plain}


@pytest.mark.parametrize("size", [2, 4])
def test_python_api_equals_single_process(vocab_model, reference, size):
    from llamaserve.llm import LLM, SamplingParams

    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    tp = LLM(str(vocab_model), max_users=4, max_seq_len=128, tensor_parallel=size, progress=False)
    try:
        assert isinstance(tp.model, LeaderModel) and tp.model.tp.size == size
        # 2 KV heads: with 4 ranks each keeps a copy of the one its query heads use.
        assert tp.model.layers[0].attention.n_kv_heads == max(1, 2 // size)
        assert [o.token_ids for o in tp.generate(["Hello there", list(range(1000, 1030))], params)] == reference["plain"]
    finally:
        tp.model.close()
    with pytest.raises(ValueError, match="tensor_parallel must be a positive integer"):
        LLM(str(vocab_model), tensor_parallel=0)


def test_generate_cli_tp2_equals_single_process(vocab_model, reference):
    import json

    cmd = [sys.executable, "-m", "llamaserve", "generate", "--model", str(vocab_model), "--prompt", CHAT, "--chat",
           "--max-tokens", str(N_TOKENS), "--ignore-eos", "--json", "--max-seq-len", "128", "--tensor-parallel", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == reference["chat_ids"] and out["text"] == reference["chat_text"]


def _stream(server, max_tokens: int) -> str:
    import httpx

    body = {"text": CHAT, "max_tokens": max_tokens, "top_k": 1, "temperature": 1.0}
    chunks = []
    with httpx.stream("POST", f"{server.url}/inference/llama3-70b", json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_text():
            chunks.append(chunk)
    text = "".join(chunks)
    assert text.endswith("<|endoftext|>")
    return text[: -len("<|endoftext|>")]


def _follower_pids(server) -> list[int]:
    out = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if any("llamaserve.parallel.follower" in part for part in child.cmdline()):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_serve_tp2_streams_and_recovers_from_a_killed_rank(tmp_path, vocab_model, reference):
    import concurrent.futures

    import httpx

    from server_fixtures import start_server

    server = start_server(tmp_path, "--weights", str(vocab_model), "--tensor-parallel", "2",
                          "--max-seq-len", "128", "--max-users", "4")
    try:
        server.wait_healthy(120)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda _: _stream(server, N_TOKENS), range(3)))
        assert texts == [reference["chat_text"]] * 3

        [pid] = _follower_pids(server)
        os.kill(pid, signal.SIGKILL)
        deadline, saw_unhealthy = time.monotonic() + 30, False
        while time.monotonic() < deadline and not saw_unhealthy:
            saw_unhealthy = httpx.get(f"{server.url}/health", timeout=5).status_code == 503
            time.sleep(0.05)
        assert saw_unhealthy, server.log_text()[-3000:]
        server.wait_healthy(120)
        assert "tensor-parallel rank 1" in server.log_text()
        [new_pid] = _follower_pids(server)
        assert new_pid != pid
        assert _stream(server, N_TOKENS) == reference["chat_text"]
    finally:
        server.stop()


def test_two_node_torchrun_on_loopback_serves_a_request(tmp_path, vocab_model, reference):
    """Two torchrun launchers (one per "node", c10d rendezvous on loopback) run the same
    `serve` command: whichever gets rank 0 serves HTTP, the other follows its steps."""
    import httpx

    from server_fixtures import free_port, wait_for_health

    rdzv_port, http_port = free_port(), free_port()
    cmd = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", f"llamaserve-test-{rdzv_port}",
           "-m", "llamaserve", "serve", "--weights", str(vocab_model), "--host", "127.0.0.1",
           "--port", str(http_port), "--max-seq-len", "128", "--max-users", "4", "--no-auth"]
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_ROOT", "MODEL_WEIGHTS_PATH", "SERVICE_PORT")}
    logs = [open(tmp_path / f"node{i}.log", "wb") for i in range(2)]
    nodes = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True) for log in logs]

    def log_tail() -> str:
        return "\n".join((tmp_path / f"node{i}.log").read_text(errors="replace")[-2500:] for i in range(2))

    try:
        wait_for_health(f"http://127.0.0.1:{http_port}", nodes, 150, log_tail)
        body = {"text": CHAT, "max_tokens": N_TOKENS, "top_k": 1}
        r = httpx.post(f"http://127.0.0.1:{http_port}/inference/llama3-70b", json=body, timeout=120)
        assert r.status_code == 200
        assert r.text == reference["chat_text"] + "<|endoftext|>"
        assert "tensor parallel: 2 ranks ready (torchrun)" in log_tail()
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGTERM)
        for n in nodes:
            try:
                n.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait(5)
        for log in logs:
            log.close()
