"""Decode and prefill speed of llamaserve at each weight precision, interleaved in one process.

    python benchmarks/make_model.py bench-out/model
    flock /tmp/bench.lock python benchmarks/precision_speed.py bench-out/model --runs 3

Every precision is loaded once (fp32; bf16 weights; int8 and int4 weight-only, packed for the
kernels as the server does), then each round measures every precision in turn at every user
count, so a busy neighbour slows all of them alike; the table gives medians over rounds and the
ratio to fp32. Decode: 128-token random prompts, 128 greedy tokens per user, the decode phase
only (benchmarks/decode_throughput.py's protocol). Prefill: one 128-token prompt, tokens/s.
"Bandwidth" is weight bytes read per decode step (every matmul and the head) over the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llamaserve  # noqa: F401  (huge pages before torch allocates, as in the server)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_throughput import PROMPT_LEN, bench_llamaserve, measured_read_bandwidth, random_prompts  # noqa: E402


def load(model_dir: Path, precision: str):
    """precision: fp32, bf16, int8 or int4, optionally with a KV cache dtype after a slash
    (bf16/kv-fp32: bf16 weights with an fp32 cache; default: what the server picks here)."""
    from llamaserve.devices import resolve_dtype
    from llamaserve.model.kv_cache import apply_kv_cache_dtype
    from llamaserve.tokenizer import load_tokenizer
    from llamaserve.weights import load_model

    weights, _, kv = precision.partition("/")
    # Quantised weights computed as the server's `--dtype auto` computes them here.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(weights) or resolve_dtype("auto", "cpu")
    quantize = weights if weights in ("int8", "int4") else None
    loaded = load_model(model_dir, dtype=dtype, progress=False, quantize=quantize)
    apply_kv_cache_dtype(loaded.model, {"": "auto", "kv-fp32": "float32", "kv-bf16": "bfloat16"}[kv])
    return loaded.model, load_tokenizer(loaded.tokenizer_dir)


def matmul_bytes(model) -> int:
    """Bytes of every weight a decode step reads (all but the embedding), before packing."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith("tok_embeddings") and not name.endswith("inv_freq"):
            total += t.numel() * t.element_size()
    return total


def prefill_tps(model, runs: int = 3) -> float:
    from llamaserve.engine.runner import ModelRunner

    runner = ModelRunner(model, max_users=1, max_seq_len=PROMPT_LEN + 8)
    prompt = random_prompts(1, model.args.vocab_size, seed=5)[0]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner.prefill(0, prompt, 0)
        times.append(time.perf_counter() - t)
    return PROMPT_LEN / min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--users", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    precisions = ns.precisions.split(",")
    users_list = [int(u) for u in ns.users.split(",")]
    models = {}
    for p in precisions:
        model, tokenizer = load(ns.model_dir, p)
        models[p] = (model, tokenizer, matmul_bytes(model))
        bench_llamaserve(model, tokenizer, [1])  # packs the weights and builds the kernels, untimed
    decode = {(p, u): [] for p in precisions for u in users_list}
    step = {(p, u): [] for p in precisions for u in users_list}
    prefill = {p: [] for p in precisions}
    bandwidth = []
    for r in range(ns.runs):
        bandwidth.append(measured_read_bandwidth(torch.device("cpu")))
        for p in precisions:
            model, tokenizer, _ = models[p]
            for users, res in bench_llamaserve(model, tokenizer, users_list).items():
                decode[p, users].append(res["decode_tps"])
                step[p, users].append(res["step_s"])
            prefill[p].append(prefill_tps(model))
            print(f"round {r + 1}: {p} " + " ".join(f"{u}:{decode[p, u][-1]:.1f}" for u in users_list)
                  + f" prefill {prefill[p][-1]:.0f}", file=sys.stderr, flush=True)
    bw = statistics.median(bandwidth)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, {ns.threads} threads, medians of {ns.runs} rounds\n")
    print("| precision | weight MB read per step | " + " | ".join(f"decode tok/s, {u} user{'s' * (u > 1)}"
                                                         for u in users_list) + " | prefill 128 tok/s | 1-user bandwidth |")
    print("|---" * (len(users_list) + 4) + "|")
    for p in precisions:
        nbytes = models[p][2]
        cells = []
        for u in users_list:
            tps = statistics.median(decode[p, u])
            base = statistics.median(decode[precisions[0], u])
            cells.append(f"{tps:.1f} ({tps / base:.2f}x)")
        s1 = statistics.median(step[p, users_list[0]])
        pf = statistics.median(prefill[p])
        print(f"| {p} | {nbytes / 1e6:.0f} | " + " | ".join(cells)
              + f" | {pf:.0f} ({pf / statistics.median(prefill[precisions[0]]):.2f}x) | "
              f"{nbytes / s1 / 1e9:.1f} GB/s = {nbytes / s1 / bw:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
