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

On a GPU (no llama.cpp there; transformers' generate with its static cache, eager unless
--hf-compile lets it compile the decode step as it does by default on CUDA):

    python benchmarks/decode_throughput.py bench-out/model --device cuda --dtype bfloat16 --runs 3
    python benchmarks/decode_throughput.py bench-out/model --device cuda --dtype bfloat16 --shape llama3-8b \
        --users 1,32 --hf-compile  # random weights of that shape built on the GPU; the directory gives the tokenizer
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Before torch allocates anything: importing llamaserve turns on huge pages for torch's allocator
# (llamaserve/__init__.py), as in the server, and here for every system measured.
import llamaserve  # noqa: F401
import torch

PROMPT_LEN = 128
GEN_LEN = 128


# Shapes for --shape: random weights built straight on the device (no checkpoint on disk).
SHAPES = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      explicit_hidden_dim=14336, rope_theta=500000.0),
    # For dry runs of benchmarks/cuda_checks.sh on a CPU (the tokenizer's vocabulary, little else).
    "tiny": dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, explicit_hidden_dim=512,
                 rope_theta=500000.0),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a streaming read of 1 GiB with torch (what a decode step mostly does)."""
    x = torch.ones(2**28, device=device)
    x.sum()
    times = []
    for _ in range(5 if device.type == "cpu" else 20):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Transformer of SHAPES[shape] with N(0, 0.02) weights (norms 1), allocated on `device`."""
    from llamaserve.config import ModelArgs
    from llamaserve.model.llama import Transformer, rope_frequencies

    args = ModelArgs(**SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval()


def random_prompts(users: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 128000), (users, PROMPT_LEN), generator=gen).tolist()


def load_llamaserve(model_dir: Path, device: torch.device, dtype: torch.dtype, shape: str | None = None):
    from llamaserve.tokenizer import load_tokenizer
    from llamaserve.weights import load_model

    if shape is not None:
        return random_model(shape, device, dtype), load_tokenizer(model_dir)
    loaded = load_model(model_dir, dtype=dtype, device=device, progress=False)
    return loaded.model, load_tokenizer(loaded.tokenizer_dir)


def bench_llamaserve(model, tokenizer, users_list: list[int], min_decode_rows: int | None = None,
                     max_seq_len: int = PROMPT_LEN + GEN_LEN + 8,
                     sampling: dict | None = None) -> dict[int, dict[str, float]]:
    from llamaserve.engine.engine import Engine, EngineConfig
    from llamaserve.engine.request import SamplingParams

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    results = {}
    for users in users_list:
        engine = Engine(model, tokenizer,
                        EngineConfig(max_users=32, max_seq_len=max_seq_len, max_queued=64,
                                     min_decode_rows=min_decode_rows))
        for i, prompt in enumerate(random_prompts(users, model.args.vocab_size, seed=users)):
            params = SamplingParams(max_tokens=GEN_LEN, ignore_eos=True, seed=i, **(sampling or {"temperature": 0.0}))
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
        del engine  # its KV pool goes back before the next engine sizes its own from the GPU's memory
        decode_tokens = generated - tokens_at_start
        decode_time = end - decode_start
        results[users] = {
            "decode_tps": decode_tokens / decode_time,
            "e2e_tps": generated / (end - started),
            "step_s": decode_time / max(1, decode_steps),
            "weight_bytes": weight_bytes,
        }
    return results


def hf_random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """transformers' Llama of SHAPES[shape] with its own random init, built on `device` (speed
    only: not llamaserve's weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaserve.config import ModelArgs

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**ModelArgs(**SHAPES[shape]).to_hf_config()))
    finally:
        torch.set_default_dtype(previous)


def bench_transformers(model_dir: Path, users_list: list[int], device: torch.device, dtype: torch.dtype,
                       compile_: bool = False, shape: str | None = None) -> dict[int, dict[str, float]]:
    from transformers import LlamaForCausalLM

    if shape is not None:
        model = hf_random_model(shape, device, dtype).eval()
    else:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    results = {}
    for users in users_list:
        ids = torch.tensor(random_prompts(users, model.config.vocab_size, seed=users), device=device)
        attn = torch.ones_like(ids)

        def run(new_tokens: int) -> float:
            sync(device)
            t = time.perf_counter()
            with torch.inference_mode():
                # On CUDA, generate compiles the decode step for a static cache unless told not to.
                model.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, cache_implementation="static", pad_token_id=0,
                               disable_compile=not compile_)
            sync(device)
            return time.perf_counter() - t

        if device.type != "cpu":
            # Kernels and cuBLAS handles out of the timed runs; compiled, the same length as the
            # timed run (the static cache's length is part of what gets compiled).
            run(GEN_LEN if compile_ else 8)
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
    parser.add_argument("--also-rows", type=int, metavar="N",
                        help="also run every user count with min_decode_rows=N (on CUDA: keys in 16-key buckets, not batch-invariant)")
    parser.add_argument("--max-seq-len", type=int, default=PROMPT_LEN + GEN_LEN + 8,
                        help="llamaserve's per-user cache length (on CUDA every decode step reads all of it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="llamaserve's requests sample (seeded) instead of greedy: the sampler in the step")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="random weights of this shape built on the device (model_dir: the tokenizer); "
                        "transformers gets its own random weights of the shape")
    parser.add_argument("--hf-compile", action="store_true",
                        help="let transformers compile its decode step (its default on CUDA); eager otherwise")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    device, dtype = torch.device(ns.device), getattr(torch, ns.dtype)
    users_list = [int(u) for u in ns.users.split(",")]

    bandwidth = statistics.median(measured_read_bandwidth(device) for _ in range(3))
    model, tokenizer = load_llamaserve(ns.model_dir, device, dtype, ns.shape)
    if device.type != "cpu":
        bench_llamaserve(model, tokenizer, [1])  # kernels and cuBLAS handles out of the timed runs
    hf_name = "transformers" + (" (compiled)" if ns.hf_compile else "")
    also = f"llamaserve, min_decode_rows={ns.also_rows}"
    runs: dict[str, list[dict[int, dict[str, float]]]] = {
        "llamaserve": [], "llamaserve, min_decode_rows=1": [], also: [], hf_name: [], "llama.cpp": []}
    seq = ns.max_seq_len
    sampling = {"temperature": ns.temperature, "top_p": ns.top_p}
    for _ in range(ns.runs):
        runs["llamaserve"].append(bench_llamaserve(model, tokenizer, users_list, max_seq_len=seq, sampling=sampling))
        # Each system's figures as soon as measured: a run cut short by its time limit keeps them.
        print("bench llamaserve", {u: round(r["decode_tps"], 1) for u, r in runs["llamaserve"][-1].items()}, flush=True)
        if ns.with_unpadded:
            # Batch-invariance off: one user decodes with 1 row (matrix-vector kernels).
            runs["llamaserve, min_decode_rows=1"].append(bench_llamaserve(model, tokenizer, [1], 1, seq))
        if ns.also_rows:
            runs[also].append(bench_llamaserve(model, tokenizer, users_list, ns.also_rows, seq))
        if not ns.skip_hf:
            runs[hf_name].append(bench_transformers(ns.model_dir, users_list, device, dtype, ns.hf_compile, ns.shape))
            print("bench", hf_name, {u: round(r["decode_tps"], 1) for u, r in runs[hf_name][-1].items()}, flush=True)
        if ns.llama_cpp:
            runs["llama.cpp"].append(bench_llama_cpp(ns.llama_cpp, ns.model_dir / "model-f32.gguf", users_list))

    def median(system: str, users: int, key: str) -> float | None:
        values = [r[users][key] for r in runs[system] if users in r]
        return statistics.median(values) if values else None

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{ns.threads} threads"
    sampled = f"sampled at temperature {ns.temperature}, top-p {ns.top_p}" if ns.temperature > 0 else "greedy"
    print(f"\n{ns.shape or ns.model_dir}, {ns.dtype} on {ns.device} ({where}), llamaserve max_seq_len {seq}, {sampled}; "
          f"memory read bandwidth (torch sum): "
          f"{bandwidth / 1e9:.1f} GB/s; medians of {ns.runs} runs")
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
