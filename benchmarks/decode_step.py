"""Where a decode step's time goes: the model's decode step on the CPU kernels, the same step on
plain torch ops, and the step's matmuls alone, interleaved in one process (medians of rounds).

    python benchmarks/decode_step.py bench-out/model --users 1
    python benchmarks/decode_step.py bench-out/model --users 1 --no-huge-pages

"matmuls only" runs the step's 49 packed matmuls on random inputs of the same shapes: the floor
that streaming the weights sets. The gap to it is everything else (norms, attention, Python).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--users", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="decode steps per round and mode")
    ap.add_argument("--no-huge-pages", action="store_true", help="THP_MEM_ALLOC_ENABLE=0 (4 KB pages)")
    args = ap.parse_args()
    if args.no_huge_pages:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # before llamaserve and torch are imported

    import torch

    from llamaserve.engine.runner import ModelRunner
    from llamaserve.model.cpu_linear import packed_linear
    from llamaserve.weights import load_model

    model = load_model(args.model_dir, progress=False).model
    runner = ModelRunner(model, max_users=32, max_seq_len=400)
    if not (model.packed and model.decode_kernels_fit()):
        print("needs an fp32 CPU model with packed weights and the decode kernels", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    for slot in range(args.users):
        runner.prefill(slot, torch.randint(0, 128000, (128,), generator=gen).tolist(), 0)
    slots, tokens, positions = list(range(args.users)), [1] * args.users, [128] * args.users

    def decode_step() -> None:
        nonlocal positions
        runner.decode(slots, tokens, positions)
        positions = [p + 1 if p < 390 else 128 for p in positions]

    matmuls = []
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        matmuls += [(attn.wqkv.packed, sum(attn.wqkv.sizes)), (attn.wo.packed_weight, attn.wo.out_features),
                    (ffn.w13.packed, sum(ffn.w13.sizes)), (ffn.w2.packed_weight, ffn.w2.out_features)]
    matmuls.append((model.output.packed_weight, model.output.out_features))
    rows = max(runner.min_decode_rows, args.users)
    inputs = [torch.randn(rows, block.feed_forward.w2.in_features if i % 4 == 3 else model.args.dim)
              for block in model.layers for i in range(4)] + [torch.randn(rows, model.args.dim)]

    def matmuls_only() -> None:
        for (weight, out_features), x in zip(matmuls, inputs):
            packed_linear(x, weight, out_features)

    fit = model._decode_kernels_fit
    plain = (fit[0], False)
    modes = {"decode step, CPU kernels": (decode_step, fit), "decode step, plain torch ops": (decode_step, plain),
             "matmuls only": (matmuls_only, fit)}
    times = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, (run, decision) in modes.items():
            model._decode_kernels_fit = decision
            run()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps)
    model._decode_kernels_fit = fit
    pages = "4 KB pages" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "0" else "huge pages"
    print(f"{args.model_dir}, {args.users} users ({rows} rows), {pages}, medians of {args.rounds} rounds x {args.steps} steps")
    print("| mode | ms per step |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
