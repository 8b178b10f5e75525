"""int8 weight-only vs fp32: forward time per step, weight bytes, logits error, on one model shape.

    python benchmarks/int8_speed.py                  # the ~272M benchmark model's shape, random weights
    python benchmarks/int8_speed.py --device cuda --dtype bfloat16   # + fp8 (weights/fp8.py) on CUDA

Also times the alternatives QuantLinear was chosen against, on one [out=2048, in=768] layer:
dequantise-then-F.linear with the scale applied to the output (what QuantLinear does), the scale
folded into the weight, and torch.ops.aten._weight_int8pack_mm.
Relative error = ||logits_int8 - logits_fp32||_2 / ||logits_fp32||_2 over every position.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from llamaserve.model.llama import Transformer, rope_frequencies
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.quant import quantize_model, quantize_tensor, weight_bytes

sys.path.insert(0, "benchmarks")
from make_model import BENCH_ARGS  # noqa: E402


def timed(fn, repeat: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--std", type=float, default=0.02)
    ns = p.parse_args()
    dev, dtype = torch.device(ns.device), getattr(torch, ns.dtype)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    args = BENCH_ARGS

    sd = {k: v.to(dev, dtype) for k, v in random_state_dict(args, 0, ns.std).items()}
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, assign=True)
    model.inv_freq = rope_frequencies(args).to(dev)
    fp_bytes = weight_bytes(model)
    with torch.device("meta"):
        ref_model = Transformer(args)
    ref_model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    ref_model.inv_freq = model.inv_freq
    qmodel = quantize_model(ref_model)
    models = [("fp32" if dtype == torch.float32 else ns.dtype, model), ("int8", qmodel)]
    if dev.type == "cuda" and dtype != torch.float16:  # fp8 computes in bf16 or fp32; emulated off Hopper
        with torch.device("meta"):
            fp8_model = Transformer(args)
        fp8_model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
        fp8_model.inv_freq = model.inv_freq
        models.append(("fp8", quantize_model(fp8_model, "fp8")))

    tokens = torch.randint(0, args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).to(dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    rows = []
    for name, m in models:
        cache = m.new_cache(33, 256)
        prefill = timed(lambda: m(tokens, zero, zero, cache), max(1, ns.repeat // 2), sync)
        decode = {}
        for b in (1, 16, 32):
            tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
            pos = torch.full((b,), 128, dtype=torch.long, device=dev)
            slots = torch.arange(b, device=dev)
            decode[b] = timed(lambda: m(tok, pos, slots, cache), ns.repeat, sync)
        rows.append((name, weight_bytes(m), prefill, decode))
    full = model(tokens, zero, zero, model.new_cache(1, 256), all_logits=True)
    errors = []
    for name, m in models[1:]:
        qfull = m(tokens, zero, zero, m.new_cache(1, 256), all_logits=True)
        errors.append(f"{name} logits relative error {float((qfull - full).norm() / full.norm()) * 100:.2f}%")

    print(f"model {args.num_parameters() / 1e6:.0f}M params, {ns.device}, {torch.get_num_threads()} threads, "
          f"weights std {ns.std}; " + ", ".join(errors))
    print("| weights | MiB | prefill 128 tok ms | decode B=1 ms | decode B=16 ms | decode B=32 ms |")
    print("|---|---|---|---|---|---|")
    for name, nbytes, prefill, decode in rows:
        print(f"| {name} | {nbytes / 2**20:.0f} ({nbytes / fp_bytes:.2f}x) | {prefill * 1e3:.0f} | "
              + " | ".join(f"{decode[b] * 1e3:.0f}" for b in (1, 16, 32)) + " |")

    # One layer, the kernels QuantLinear chose between.
    w = torch.randn(2048, 768, device=dev, dtype=dtype) * ns.std
    q, s = quantize_tensor(w)
    s = s.to(dev)
    print("\n| one [2048 x 768] layer | B=1 ms | B=32 ms | B=512 ms |")
    print("|---|---|---|---|")
    kernels = {
        "fp F.linear": lambda x: F.linear(x, w),
        "int8: F.linear(x, q.to(dtype)) * scale (QuantLinear off CUDA)": lambda x: F.linear(x, q.to(x.dtype)) * s.to(x.dtype),
        "int8: F.linear(x, q.to(dtype) * scale[:, None])": lambda x: F.linear(x, q.to(x.dtype) * s[:, None].to(x.dtype)),
        "int8: aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s.to(x.dtype)),
    }
    if dev.type == "cuda" and dtype != torch.float32:
        from llamaserve.weights import int8_cuda

        from llamaserve.weights.fp8 import fp8_linear, quantize_fp8

        kernels["int8: fused Triton kernel (QuantLinear on CUDA)"] = lambda x: int8_cuda.matmul(x, q, s)
        q8, s8 = quantize_fp8(w)
        kernels["fp8: activations per row + _scaled_mm (QuantLinear fp8)"] = lambda x: fp8_linear(x, q8, s8)
    for name, fn in kernels.items():
        cells = []
        for b in (1, 32, 512):
            x = torch.randn(b, 768, device=dev, dtype=dtype)
            try:
                cells.append(f"{timed(lambda: fn(x), 3 if b == 512 else ns.repeat, sync) * 1e3:.2f}")
            except (RuntimeError, NotImplementedError) as exc:  # a kernel missing for the device
                cells.append(f"n/a ({str(exc)[:40]})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
