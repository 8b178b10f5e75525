"""Decode throughput at 1, 8 and 32 concurrent users: llamaserve vs HF transformers vs llama.cpp.

Every system reads the same weights (benchmarks/make_model.py), gets 128-token random prompts and
generates 128 tokens per user. Decode throughput excludes prefill:
- llamaserve: from the step where every user has its first token to the last token;
- transformers: generate(128 new tokens) minus generate(1 new token), static cache, greedy;
- llama.cpp: llama-batched-bench's S_TG column (text generation tokens/s over all users).
The table also gives llamaserve's achieved weight-read bandwidth against the machine's measured
memory read bandwidth (weight bytes read per decode step / step time).

    python benchmarks/make_model.py bench-out/model --gguf LLAMA_CPP_DIR
    python benchmarks/decode_throughput.py bench-out/model --llama-cpp LLAMA_CPP_DIR/build/bin --runs 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_LEN = 128
GEN_LEN = 128


def measured_read_bandwidth() -> float:
    """Bytes/s of a streaming read of 1 GiB with torch (what a decode step mostly does)."""
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def random_prompts(users: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 128000), (users, PROMPT_LEN), generator=gen).tolist()


def bench_llamaserve(model_dir: Path, users_list: list[int], min_decode_rows: int | None = None) -> dict[int, dict[str, float]]:
    from llamaserve.engine.engine import Engine, EngineConfig
    from llamaserve.engine.request import SamplingParams
    from llamaserve.tokenizer import load_tokenizer
    from llamaserve.weights import load_model

    loaded = load_model(model_dir, progress=False)
    tokenizer = load_tokenizer(loaded.tokenizer_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    weight_bytes -= loaded.model.tok_embeddings.weight.numel() * loaded.model.tok_embeddings.weight.element_size()
    results = {}
    for users in users_list:
        engine = Engine(loaded.model, tokenizer,
                        EngineConfig(max_users=32, max_seq_len=PROMPT_LEN + GEN_LEN + 8, max_queued=64,
                                     min_decode_rows=min_decode_rows))
        params = SamplingParams(max_tokens=GEN_LEN, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(random_prompts(users, loaded.args.vocab_size, seed=users)):
            engine.add_request(f"r{i}", prompt, params)
        started = time.perf_counter()
        first_token_seen: set[str] = set()
        decode_start = None
        generated = 0
        decode_steps = 0
        while engine.has_unfinished():
            outputs = engine.step()
            for out in outputs:
                generated += len(out.new_token_ids)
                if out.new_token_ids:
                    first_token_seen.add(out.request_id)
            if decode_start is None and len(first_token_seen) == users:
                decode_start, tokens_at_start = time.perf_counter(), generated
            elif decode_start is not None:
                decode_steps += 1
        end = time.perf_counter()
        decode_tokens = generated - tokens_at_start
        decode_time = end - decode_start
        results[users] = {
            "decode_tps": decode_tokens / decode_time,
            "e2e_tps": generated / (end - started),
            "step_s": decode_time / max(1, decode_steps),
            "weight_bytes": weight_bytes,
        }
    return results


def bench_transformers(model_dir: Path, users_list: list[int]) -> dict[int, dict[str, float]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    results = {}
    for users in users_list:
        ids = torch.tensor(random_prompts(users, model.config.vocab_size, seed=users))
        attn = torch.ones_like(ids)

        def run(new_tokens: int) -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, cache_implementation="static", pad_token_id=0)
            return time.perf_counter() - t

        one = run(1)
        full = run(GEN_LEN)
        results[users] = {"decode_tps": users * (GEN_LEN - 1) / (full - one), "e2e_tps": users * GEN_LEN / full}
    return results


def bench_llama_cpp(bin_dir: Path, gguf: Path, users_list: list[int]) -> dict[int, dict[str, float]]:
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(max(users_list) * (PROMPT_LEN + GEN_LEN + 8)),
           "-b", "2048", "-ub", "512", "-npp", str(PROMPT_LEN), "-ntg", str(GEN_LEN),
           "-npl", ",".join(map(str, users_list)), "-t", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    results = {}
    # Table rows: |  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0] or "x"):
            users = int(cells[2])
            results[users] = {"decode_tps": float(cells[7]), "e2e_tps": float(cells[9])}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--users", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3, help="repeat each system, report medians")
    parser.add_argument("--llama-cpp", type=Path, metavar="BIN_DIR", help="folder with llama-batched-bench")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--with-unpadded", action="store_true",
                        help="also run 1 user with min_decode_rows=1 (fast, not batch-invariant)")
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    users_list = [int(u) for u in ns.users.split(",")]

    bandwidth = statistics.median(measured_read_bandwidth() for _ in range(3))
    runs: dict[str, list[dict[int, dict[str, float]]]] = {
        "llamaserve": [], "llamaserve, min_decode_rows=1": [], "transformers": [], "llama.cpp": []}
    for _ in range(ns.runs):
        runs["llamaserve"].append(bench_llamaserve(ns.model_dir, users_list))
        if ns.with_unpadded:
            # Batch-invariance off: one user decodes with 1 row (matrix-vector kernels).
            runs["llamaserve, min_decode_rows=1"].append(bench_llamaserve(ns.model_dir, [1], min_decode_rows=1))
        if not ns.skip_hf:
            runs["transformers"].append(bench_transformers(ns.model_dir, users_list))
        if ns.llama_cpp:
            runs["llama.cpp"].append(bench_llama_cpp(ns.llama_cpp, ns.model_dir / "model-f32.gguf", users_list))

    def median(system: str, users: int, key: str) -> float | None:
        values = [r[users][key] for r in runs[system] if users in r]
        return statistics.median(values) if values else None

    print(f"\nmemory read bandwidth (torch sum, {ns.threads} threads): {bandwidth / 1e9:.1f} GB/s; medians of {ns.runs} runs")
    print("| users | system | decode tok/s/user | decode tok/s | ratio to llamaserve | llamaserve bandwidth use |")
    print("|---|---|---|---|---|---|")
    for users in users_list:
        ours = median("llamaserve", users, "decode_tps")
        for system in runs:
            tps = median(system, users, "decode_tps")
            if tps is None:
                continue
            extra = ""
            if system.startswith("llamaserve"):
                step = median(system, users, "step_s")
                weight_bytes = runs[system][0][users]["weight_bytes"]
                extra = f"{weight_bytes / step / 1e9:.1f} GB/s = {weight_bytes / step / bandwidth:.0%}"
            print(f"| {users} | {system} | {tps / users:.1f} | {tps:.1f} | {tps / ours:.2f} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
