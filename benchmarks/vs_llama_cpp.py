"""llamaserve at each weight precision against llama.cpp's same-class GGUF types, interleaved
rounds in one sitting: fp32 ~ F32, bf16 ~ BF16, int8 ~ Q8_0, int4 ~ Q4_K_M.

    python benchmarks/make_model.py bench-out/model --gguf LLAMA_CPP_DIR
    for t in BF16 Q8_0 Q4_K_M; do LLAMA_CPP_DIR/build/bin/llama-quantize \
        bench-out/model/model-f32.gguf bench-out/model/model-$t.gguf $t; done
    flock /tmp/bench.lock python benchmarks/vs_llama_cpp.py bench-out/model LLAMA_CPP_DIR/build/bin --runs 3

Each round runs every llamaserve precision (precision_speed.py's protocol) and then
`llama-batched-bench` on every GGUF type (128-token prompts, 128 generated tokens, the S_TG
column for decode, S_PP at one user for prefill), so a busy neighbour slows both alike. The
table gives medians over rounds and, for each llamaserve precision, the ratio to its llama.cpp
class. `--no-repack` passes llama.cpp's -nr (its weight repacking crashed on AMX machines).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import llamaserve  # noqa: F401  (huge pages before torch allocates, as in the server)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_throughput import GEN_LEN, PROMPT_LEN, bench_llamaserve  # noqa: E402
from precision_speed import load, prefill_tps  # noqa: E402

CLASSES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}


def llama_cpp_type(precision: str) -> str:
    """The GGUF type a precision compares with; bf16/kv-fp32 (precision_speed.load's names)
    compares as its weights."""
    return CLASSES[precision.partition("/")[0]]


def gguf_path(model_dir: Path, kind: str) -> Path:
    return model_dir / f"model-{'f32' if kind == 'F32' else kind}.gguf"


def llama_cpp_round(bin_dir: Path, gguf: Path, users: list[int], threads: int, no_repack: bool):
    """{users: decode tok/s}, prefill tok/s at one user."""
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(max(users) * (PROMPT_LEN + GEN_LEN + 8)),
           "-b", "2048", "-ub", "512", "-npp", str(PROMPT_LEN), "-ntg", str(GEN_LEN),
           "-npl", ",".join(map(str, users)), "-t", str(threads)] + (["-nr"] if no_repack else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    decode, prefill = {}, None
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0] or "x"):
            decode[int(cells[2])] = float(cells[7])
            if int(cells[2]) == 1:
                prefill = float(cells[5])
    if set(decode) != set(users):
        raise RuntimeError(f"llama-batched-bench printed no row for some of {users}:\n{out[-2000:]}")
    return decode, prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="make_model.py's output, with the model-*.gguf files")
    parser.add_argument("llama_cpp_bin", type=Path, help="folder with llama-batched-bench")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--users", default="1,8,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-repack", action="store_true")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    precisions, users = ns.precisions.split(","), [int(u) for u in ns.users.split(",")]
    for p in precisions:
        if not gguf_path(ns.model_dir, llama_cpp_type(p)).exists():
            parser.error(f"{gguf_path(ns.model_dir, llama_cpp_type(p))} is missing (see the commands above)")
    models = {p: load(ns.model_dir, p) for p in precisions}
    for model, tokenizer in models.values():
        bench_llamaserve(model, tokenizer, [1])  # packs the weights and builds the kernels, untimed
    ours = {(p, u): [] for p in precisions for u in users + ["prefill"]}
    theirs = {(p, u): [] for p in precisions for u in users + ["prefill"]}
    for r in range(ns.runs):
        for p in precisions:
            model, tokenizer = models[p]
            for u, res in bench_llamaserve(model, tokenizer, users).items():
                ours[p, u].append(res["decode_tps"])
            ours[p, "prefill"].append(prefill_tps(model))
            decode, prefill = llama_cpp_round(ns.llama_cpp_bin, gguf_path(ns.model_dir, llama_cpp_type(p)), users,
                                              ns.threads, ns.no_repack)
            for u in users:
                theirs[p, u].append(decode[u])
            theirs[p, "prefill"].append(prefill)
            print(f"round {r + 1} {p}: ours " + " ".join(f"{u}:{ours[p, u][-1]:.1f}" for u in users + ["prefill"])
                  + f" | {llama_cpp_type(p)} " + " ".join(f"{u}:{theirs[p, u][-1]:.1f}" for u in users + ["prefill"]),
                  file=sys.stderr, flush=True)
    cols = [f"{u} user{'s' * (u > 1)}" for u in users] + ["prefill 128"]
    print(f"tok/s, {ns.threads} threads, medians of {ns.runs} rounds (ratio: llamaserve / llama.cpp)\n")
    print("| llamaserve vs llama.cpp | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for p in precisions:
        cells = []
        for u in users + ["prefill"]:
            a, b = statistics.median(ours[p, u]), statistics.median(theirs[p, u])
            cells.append(f"{a:.1f} / {b:.1f} = **{a / b:.2f}x**")
        print(f"| {p} / {llama_cpp_type(p)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
