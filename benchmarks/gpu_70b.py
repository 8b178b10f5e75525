"""A Llama-3-70B-shaped model with FP8 weights on one GPU: decode speed at 1 and 32 users.

The weights are random, drawn tensor by tensor on the device and quantised there (e4m3, one
scale per output channel: weights/fp8.py), so nothing is read from disk and the peak is the FP8
model plus one bf16 tensor. The KV cache (bf16, or e4m3 with --kv-cache-dtype fp8) holds
--max-seq-len tokens for every user. Each
run goes through the Engine (prefill, captured CUDA-graph decode steps, the sampler), as a
server would: 128-token random prompts, 128 greedy tokens per user; decode speed is measured
from the step where every user has its first token, as in decode_throughput.py.

    python benchmarks/gpu_70b.py                      # 70B shape on cuda, 1 and 32 users
    python benchmarks/gpu_70b.py --kv-cache-dtype fp8 # the same with an FP8 KV cache: twice the users fit
    python benchmarks/gpu_70b.py --dry-run            # a tiny shape on the CPU (emulated FP8): the same code path

Targets (issue 14): 32 users >= 20 tok/s per user, 1 user >= 25 tok/s, on one H200.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import llamaserve  # noqa: F401  (huge pages for torch's allocator, as in the server)
import torch

from llamaserve.config import ModelArgs
from llamaserve.model.kv_cache import apply_kv_cache_dtype
from llamaserve.weights.fp8 import quantize_fp8
from llamaserve.weights.layout import expected_shapes
from llamaserve.weights.quant import build_quantized_model, is_quantized_name, scale_name, weight_bytes

SHAPES = {
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                            explicit_hidden_dim=28672, rope_theta=500000.0),
    "tiny": ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024, explicit_hidden_dim=512,
                      rope_theta=500000.0),
}
PROMPT_LEN, GEN_LEN = 128, 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_fp8_model(args: ModelArgs, device: torch.device, seed: int = 0):
    """The model with N(0, 0.02) weights quantised to FP8 on `device` one tensor at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qsd = {}
    for name, shape in expected_shapes(args).items():
        if not is_quantized_name(name):
            qsd[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)  # norms
            continue
        w = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
        qsd[name], qsd[scale_name(name)] = quantize_fp8(w)
        del w
    return build_quantized_model(args, qsd, compute_dtype=torch.bfloat16)


def kv_capacity(model, device: torch.device, max_seq_len: int) -> str:
    """How many users of max_seq_len tokens the memory left after the weights would hold."""
    if device.type != "cuda":
        return "n/a on CPU"
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the build's freed temporaries
    per_token = model.kv_bytes_per_token()
    reserve = 4 << 30  # activations, the graph's pool, the logits
    users = max(0, free - reserve) // (per_token * max_seq_len)
    kind = str(model.kv_cache_dtype()).removeprefix("torch.")
    return (f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} after the weights: {users} users x {max_seq_len} "
            f"{kind} tokens ({per_token / 1024:.0f} KiB a token)")


def run_users(model, tokenizer, users: int, max_seq_len: int, gen_len: int, prompt_len: int) -> dict[str, float]:
    from llamaserve.engine.engine import Engine, EngineConfig
    from llamaserve.engine.request import SamplingParams

    kv_gib = 32 * max_seq_len * model.kv_bytes_per_token() / 2**30  # 32 users' full contexts, every run alike
    engine = Engine(model, tokenizer, EngineConfig(max_users=32, max_seq_len=max_seq_len, max_queued=64,
                                                   kv_cache_memory=kv_gib, prefix_cache=False))
    gen = torch.Generator().manual_seed(users)
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    for i in range(users):
        engine.add_request(f"r{i}", torch.randint(0, 128000 if model.args.vocab_size > 128000 else 256,
                                                  (prompt_len,), generator=gen).tolist(), params)
    seen, generated, steps, start, at_start = set(), 0, 0, None, 0
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.new_token_ids)
            if out.new_token_ids:
                seen.add(out.request_id)
        if start is None and len(seen) == users:
            sync(model.device)
            start, at_start = time.perf_counter(), generated
        elif start is not None:
            steps += 1
    sync(model.device)
    elapsed = time.perf_counter() - start
    captured = engine.runner.captured is not None
    del engine
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    tps = (generated - at_start) / elapsed
    return {"tps": tps, "per_user": tps / users, "step_ms": 1000 * elapsed / max(1, steps), "graphs": captured}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU, few tokens: checks the script")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--users", default="1,32")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length per user (decode reads all of it)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16), or fp8: an e4m3 cache")
    parser.add_argument("--gen", type=int, default=None, help=f"tokens per user (default {GEN_LEN}; dry run 8)")
    ns = parser.parse_args()
    shape = ns.shape or ("tiny" if ns.dry_run else "llama3-70b")
    device = torch.device(ns.device or ("cpu" if ns.dry_run else "cuda"))
    gen_len = ns.gen or (8 if ns.dry_run else GEN_LEN)
    prompt_len = 16 if ns.dry_run else PROMPT_LEN
    max_seq_len = 64 if ns.dry_run else ns.max_seq_len
    args = SHAPES[shape]

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from engine_util import ByteTokenizer  # ids only: nothing is detokenised for the measurement

    t0 = time.perf_counter()
    model = random_fp8_model(args, device)
    apply_kv_cache_dtype(model, ns.kv_cache_dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    layer_bytes = weight_bytes(model) - weight_bytes(model.tok_embeddings)  # what a decode step reads
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (FP8 emulated)"
    print(f"{shape} FP8 on {where}: {args.num_parameters() / 1e6:.1f}M parameters, {weight_bytes(model) / 1e9:.2f} GB "
          f"of weights, built on the device in {build_s:.1f} s; {kv_capacity(model, device, max_seq_len)}")
    tokenizer = ByteTokenizer(args.vocab_size)
    run_users(model, tokenizer, 1, max_seq_len, min(gen_len, 8), prompt_len)  # warm-up: capture, cuBLAS handles
    print(f"| users | tok/s/user | tok/s | step ms | weight read GB/s | CUDA graph | cache length |")
    print("|---|---|---|---|---|---|---|")
    for users in [int(u) for u in ns.users.split(",")]:
        r = run_users(model, tokenizer, users, max_seq_len, gen_len, prompt_len)
        print(f"| {users} | {r['per_user']:.1f} | {r['tps']:.1f} | {r['step_ms']:.1f} | "
              f"{layer_bytes / (r['step_ms'] / 1000) / 1e9:.0f} | {'yes' if r['graphs'] else 'no'} | {max_seq_len} |")
    if device.type == "cuda":
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
