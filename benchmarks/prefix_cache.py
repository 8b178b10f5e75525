"""Time to first token of users sharing a long system prompt, with and without the prefix cache.

Every user sends the same system prompt (random token ids) followed by its own question; all of
them arrive at once. The engine runs in this process (no HTTP); a user's TTFT is the time from
submission to its first token. Each engine first serves a warm-up batch (its KV pool's pages
are then faulted in, as in a running server). The runs alternate (without, with, without, ...) in one process
on the same loaded model, so both see the same machine; the table gives per-mode medians over
users and runs, and the KV cache's bytes per token and pool size.

    python benchmarks/prefix_cache.py bench-out/model --users 32 --system 2000 --question 50 --runs 1
    python benchmarks/prefix_cache.py bench-out/model --prefill-chunk 64   # smaller chunks
    python benchmarks/prefix_cache.py bench-out/model --dtype float32      # reuse by whole chunks only

Where prefill is chunk-invariant (bf16/int8/int4 weights on the CPU kernels: the default on CPUs
with AVX512-BF16 or AMX) a prefix is reused to its last full 16-token block; with fp32 weights
only in whole prefill chunks, so there the chunk size decides how much is reused.
    python benchmarks/prefix_cache.py builtin --prefill-chunk 64           # the small built-in model
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import llamaserve  # noqa: F401 - huge pages for torch's allocator, as in the server
import torch

from llamaserve.devices import resolve_dtype
from llamaserve.engine.engine import Engine, EngineConfig
from llamaserve.engine.request import SamplingParams
from llamaserve.tokenizer import load_tokenizer
from llamaserve.model.kv_cache import apply_kv_cache_dtype
from llamaserve.weights import load_model


def prompts(users: int, system: int, question: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000, 20000) for _ in range(system)]
    return [shared + [rng.randrange(1000, 20000) for _ in range(question)] for _ in range(users)]


def new_engine(model, tokenizer, prefix_cache: bool, args) -> Engine:
    return Engine(model, tokenizer, EngineConfig(
        max_users=args.users, max_seq_len=args.system + args.question + args.max_tokens + 16,
        prefill_chunk=args.prefill_chunk, max_prefill_tokens=args.max_prefill_tokens, prefix_cache=prefix_cache,
        kv_cache_memory=args.kv_cache_memory))


def run(engine: Engine, batch: list[list[int]], args) -> tuple[list[float], dict]:
    """Every prompt of `batch` submitted at once; each one's TTFT, and the engine's stats (the
    counters are the engine's totals: `delta` subtracts the warm-up's)."""
    before = engine.stats()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(batch):
        engine.add_request(f"{id(batch)}-{i}", ids, params)
    ttft: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            ttft.setdefault(out.request_id, time.perf_counter() - t0)
            tokens.setdefault(out.request_id.split("-")[1], []).extend(out.new_token_ids)
    stats = engine.stats()
    for key in ("prefill_tokens", "prefix_cache_hits", "prefix_cache_queries"):
        stats[key] -= before[key]
    stats["tokens"] = tokens
    return [ttft[f"{id(batch)}-{i}"] for i in range(len(batch))], stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="checkpoint directory, or builtin")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--system", type=int, default=2000, help="shared system-prompt tokens")
    p.add_argument("--question", type=int, default=50, help="tokens of each user's own question")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="prefill budget per step (default: one chunk)")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="GiB (default: every user's full length)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="auto (what `llamaserve serve` picks here), float32 or bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (what `llamaserve serve` picks here), float32 or bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    loaded = load_model(None if args.model_dir == "builtin" else args.model_dir, dtype=dtype, device="cpu")
    apply_kv_cache_dtype(loaded.model, args.kv_cache_dtype)
    model, tokenizer = loaded.model, load_tokenizer(loaded.tokenizer_dir)
    engines = {cached: new_engine(model, tokenizer, cached, args) for cached in (False, True)}
    # A fresh KV pool is memory the kernel has not handed out yet: its first writes fault in
    # (huge) zeroed pages, seconds for a pool of GiBs. A server pays that once; so does a warm-up
    # here, with a system prompt of its own (each run's differs too, or the cache would hold it).
    for engine in engines.values():
        run(engine, prompts(args.users, args.system, args.question, seed=10_000), args)

    ttfts: dict[bool, list[float]] = {False: [], True: []}
    same = True
    for r in range(args.runs):
        batch = prompts(args.users, args.system, args.question, seed=r)
        outputs = {}
        for cached in (False, True):
            times, stats = run(engines[cached], batch, args)
            ttfts[cached] += times
            outputs[cached] = stats["tokens"]
            print(f"run {r + 1} prefix cache {'on ' if cached else 'off'}: median TTFT {statistics.median(times):.2f} s, "
                  f"prefilled {stats['prefill_tokens']} tokens, cache hits {stats['prefix_cache_hits']} "
                  f"of {stats['prefix_cache_queries']}", flush=True)
        same = same and outputs[False] == outputs[True]
    off, on = statistics.median(ttfts[False]), statistics.median(ttfts[True])
    kv = stats["kv_bytes_per_token"]
    print(f"\n{args.users} users, {args.system}-token system prompt + {args.question}-token questions, "
          f"prefill chunk {args.prefill_chunk}, {str(dtype).removeprefix('torch.')}, "
          f"KV cache {str(loaded.model.kv_cache_dtype()).removeprefix('torch.')}, {args.runs} run(s)")
    print("| prefix cache | median TTFT (s) | p90 TTFT (s) |")
    print("|---|---|---|")
    for cached, med in ((False, off), (True, on)):
        p90 = statistics.quantiles(ttfts[cached], n=10)[-1]
        print(f"| {'on' if cached else 'off'} | {med:.2f} | {p90:.2f} |")
    print(f"\nTTFT ratio off/on: {off / on:.1f}x; tokens identical with and without: {same}")
    print(f"KV cache: {kv} bytes per token ({kv * 16} per 16-token block), pool {stats['kv_blocks']} blocks = "
          f"{stats['kv_tokens']} tokens = {stats['kv_tokens'] * kv / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
