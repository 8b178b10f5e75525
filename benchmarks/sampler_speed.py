"""The sampler alone: host sampler (grouped rows, per-request random.Random) against the device
sampler (engine/sampling/on_device.py) on one batch of logits, per sampling mode.

    python benchmarks/sampler_speed.py                       # CPU, 32 rows x 128256
    python benchmarks/sampler_speed.py --device cuda --rows 33

Each mode's batch is every row with the mode's parameters (seeded); times are medians of
`--repeats` calls after `--warmup`, synchronised on CUDA. Ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llamaserve.engine.request import SamplingParams
from llamaserve.engine.sampling.sampler import SAMPLER_ENV, Sampler

MODES = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 40": dict(temperature=0.8, top_k=40),
    "mixed": None,  # a quarter of each of the above
}


def params_for(mode: str, rows: int) -> list[SamplingParams]:
    kinds = [k for k in MODES.values() if k is not None]
    if MODES[mode] is None:
        return [SamplingParams(seed=i, **kinds[i % len(kinds)]) for i in range(rows)]
    return [SamplingParams(seed=i, **MODES[mode]) for i in range(rows)]


def time_sampler(kind: str, logits: torch.Tensor, params, repeats: int, warmup: int) -> float:
    os.environ[SAMPLER_ENV] = kind
    s = Sampler(logits.shape[1], logits.device, rows=logits.shape[0])
    states = [s.start(p, [1]) for p in params]
    times = []
    for i in range(warmup + repeats):
        x = logits.clone()
        if logits.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        s.sample(x, states)  # returns token ids as a list: the host has them
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(args.device)
    print(f"sampler on {args.device}: {args.rows} rows x {args.vocab}, medians of {args.repeats} calls")
    print("| mode | host sampler | device sampler | host / device |")
    print("|---|---|---|---|")
    for mode in MODES:
        params = params_for(mode, args.rows)
        host = time_sampler("host", logits, params, args.repeats, args.warmup)
        device = time_sampler("device", logits, params, args.repeats, args.warmup)
        print(f"| {mode} | {host * 1e3:.2f} ms | {device * 1e3:.2f} ms | {host / device:.2f}x |")


if __name__ == "__main__":
    main()
