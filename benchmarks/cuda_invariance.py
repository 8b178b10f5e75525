"""What batch invariance rests on, measured on a CUDA GPU: cuBLAS rows and attention masked tails.

Prints three tables:
1. F.linear rows: for the benchmark model's and a Llama-3-8B's layer shapes, which decode row
   counts (1..64) give a row the same bits (classes of identical results), and whether, at one
   fixed row count, a row's bits depend on its position or on the other rows.
2. scaled_dot_product_attention as the model calls it (bool mask, grouped KV heads, keys read as
   a view of the cache up to a 16-key bucket): for each backend that accepts the call, whether a
   row's result depends on the masked tail length or the batch, and its time.
3. The engine tests (tests/test_engine.py: probes alone vs. in a changing crowd of 32 users, and
   every user of a batch vs. its solo run) on a bf16 and an fp32 model: with the runner's default
   padding, with decode padded to 16 rows only, under each attention backend, and with every
   call reading keys up to the cache length (one key length for all calls).

    PYTHONPATH=src python benchmarks/cuda_invariance.py [linear] [attention] [engine]
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # PROBE_DEVICE=cpu PROBE_QUICK=1: a dry run
QUICK = bool(os.environ.get("PROBE_QUICK"))
SHAPES = {  # (in, out) of every distinct linear layer
    "bench 250M": [(768, 768), (768, 256), (768, 2048), (2048, 768), (768, 128256)],
    "llama3 8B": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256)],
}


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def linear_rows(dtype: torch.dtype) -> None:
    print(f"\n## F.linear rows, {dtype}: classes of row counts 1..64 giving row 0 identical bits")
    print("| model | in x out | classes | fixed 32 rows: row moved / others changed |")
    print("|---|---|---|---|")
    gen = torch.Generator(device=DEV).manual_seed(0)
    for model, shapes in SHAPES.items():
        for n_in, n_out in shapes[:1] if QUICK else shapes:
            w = torch.randn(n_out, n_in, device=DEV, dtype=dtype, generator=gen) * 0.02
            x = torch.randn(64, n_in, device=DEV, dtype=dtype, generator=gen)
            classes: list[tuple[torch.Tensor, list[int]]] = []
            for rows in range(1, 65):
                r0 = F.linear(x[:rows], w)[0]
                for ref, members in classes:
                    if torch.equal(ref, r0):
                        members.append(rows)
                        break
                else:
                    classes.append((r0, [rows]))
            text = "; ".join(_ranges(m) for _, m in classes)
            full = F.linear(x[:32], w)
            moved = F.linear(torch.roll(x[:32], 17, 0), w)[17]
            others = x[:32].clone()
            others[1:] = torch.randn(31, n_in, device=DEV, dtype=dtype, generator=gen)
            changed = F.linear(others, w)[0]
            fixed = f"{'same' if torch.equal(moved, full[0]) else 'DIFFERS'} / {'same' if torch.equal(changed, full[0]) else 'DIFFERS'}"
            print(f"| {model} | {n_in} x {n_out} | {text} | {fixed} |")


def _ranges(values: list[int]) -> str:
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def attention(dtype: torch.dtype) -> None:
    print(f"\n## scaled_dot_product_attention, {dtype}, decode (1 query per row), bool mask, keys a view of the cache")
    print("| shape | backend | accepted | tail 16..max_seq | 16 vs 32 rows / row moved in 32 | us per call (32 rows, 512 keys) |")
    print("|---|---|---|---|---|---|")
    backends = {"default": None, "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient, KV heads expanded": SDPBackend.EFFICIENT_ATTENTION,
                "math, KV heads expanded": SDPBackend.MATH}
    for name, (heads, kv_heads, hd) in {"bench 12/4x64": (12, 4, 64), "8B 32/8x128": (32, 8, 128)}.items():
        gen = torch.Generator(device=DEV).manual_seed(1)
        slots, max_seq = 32, 1024
        keys = torch.randn(slots, kv_heads, max_seq, hd, device=DEV, dtype=dtype, generator=gen)
        values = torch.randn(slots, kv_heads, max_seq, hd, device=DEV, dtype=dtype, generator=gen)
        q = torch.randn(slots, heads, 1, hd, device=DEV, dtype=dtype, generator=gen)
        pos = torch.randint(0, 300, (slots,), device=DEV, generator=gen)
        pos[0] = 40  # the row we follow

        def call(rows: int, kv_len: int, order: torch.Tensor | None = None) -> torch.Tensor:
            idx = torch.arange(rows, device=DEV) if order is None else order
            mask = (torch.arange(kv_len, device=DEV)[None, :] <= pos[idx][:, None]).view(rows, 1, 1, kv_len)
            k, v = keys[:rows, :, :kv_len], values[:rows, :, :kv_len]
            if order is not None:
                k, v = keys[idx, :, :kv_len], values[idx, :, :kv_len]
            if expand:  # what the model could do instead: copy the KV heads out to query-head width
                k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            return F.scaled_dot_product_attention(q[idx], k, v, attn_mask=mask, enable_gqa=not expand)

        for bname, backend in backends.items():
            expand = bname.endswith("expanded")
            ctx = sdpa_kernel([backend]) if backend is not None else _null()
            try:
                with ctx:
                    ref = call(32, 304)[0]
                    tails = [torch.equal(call(32, L)[0], ref) for L in range(304, max_seq + 1, 16)]
                    order = torch.cat([torch.arange(1, 32, device=DEV)[:20], torch.zeros(1, dtype=torch.long, device=DEV),
                                       torch.arange(21, 32, device=DEV)])
                    batch_ok = torch.equal(call(16, 304)[0], ref)
                    moved_ok = torch.equal(call(32, 304, order)[20], ref)
                    for _ in range(3):
                        call(32, 512)
                    sync()
                    t = time.perf_counter()
                    for _ in range(50):
                        call(32, 512)
                    sync()
                    us = (time.perf_counter() - t) / 50 * 1e6
                tail = "invariant" if all(tails) else f"DIFFERS at {sum(not ok for ok in tails)}/{len(tails)} lengths"
                same = {True: "same", False: "DIFFERS"}
                print(f"| {name} | {bname} | yes | {tail} | {same[batch_ok]} / {same[moved_ok]} | {us:.0f} |")
            except RuntimeError as exc:
                print(f"| {name} | {bname} | no: {_first_line(exc)} | | | |")
    if hasattr(torch, "_fused_sdp_choice"):
        for heads, kv_heads, hd in ((4, 2, 16), (12, 4, 64), (2, 1, 128), (32, 8, 128)):
            q = torch.randn(32, heads, 1, hd, device=DEV, dtype=dtype)
            k = torch.randn(32, kv_heads, 64, hd, device=DEV, dtype=dtype)
            mask = torch.ones(32, 1, 1, 64, dtype=torch.bool, device=DEV)
            try:
                choice = SDPBackend(torch._fused_sdp_choice(q, k, k, attn_mask=mask, enable_gqa=True))
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                choice = f"unknown ({exc})"
            print(f"default backend for {heads}/{kv_heads} heads x {hd}, {dtype}: {choice}")


def _first_line(exc: BaseException) -> str:
    return ((str(exc) or repr(exc)).splitlines() or [""])[0][:90]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def engine_crowd() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_engine
    from engine_util import tiny_model
    from test_cuda import _cuda_model

    from llamaserve.model import kv_cache

    base_cfg = dict(test_engine.CFG)
    bucket = kv_cache.KV_BUCKET
    # (extra EngineConfig, attention backend or "whole-cache" for one key length in every call)
    variants = {
        "runner default": ({}, None),
        "decode padded to 16 rows": ({"min_decode_rows": 16}, None),
        "all 32 rows, 16-key buckets (no spare slot)": ({"min_decode_rows": 32}, None),
        "math attention": ({}, SDPBackend.MATH),
        "keys always read to max_seq_len": ({"min_decode_rows": 32}, "whole-cache"),
    }
    runs = [
        ("head size 128", torch.bfloat16, ["runner default", "all 32 rows, 16-key buckets (no spare slot)",
                                          "decode padded to 16 rows", "math attention"]),
        ("head size 128", torch.float32, ["runner default", "all 32 rows, 16-key buckets (no spare slot)", "keys always read to max_seq_len"]),
        ("head size 64, 12/4 heads", torch.float32, ["runner default", "all 32 rows, 16-key buckets (no spare slot)"]),
        ("head size 64, 12/4 heads", torch.bfloat16, ["runner default", "all 32 rows, 16-key buckets (no spare slot)"]),
        ("head size 16", torch.bfloat16, ["runner default"]),
        ("head size 16", torch.float32, ["runner default"]),
    ]
    print("\n## engine: probes alone vs. in a changing crowd of 32 users, and every user vs. its solo run (tests/test_engine.py)")
    for model_name, dtype, names in runs:
        if model_name == "head size 16":
            model = tiny_model().to(DEV, dtype)
        else:
            model = _cuda_model(dtype, DEV, heads=(2, 1) if model_name == "head size 128" else (12, 4))
        for name in names:
            extra, backend = variants[name]
            test_engine.CFG = dict(base_cfg, **extra)
            ctx = sdpa_kernel([backend]) if isinstance(backend, SDPBackend) else _null()
            kv_cache.KV_BUCKET = base_cfg["max_seq_len"] if backend == "whole-cache" else bucket
            t = time.perf_counter()
            try:
                with ctx:
                    test_engine.test_requests_give_identical_tokens_alone_and_in_a_changing_crowd(model)
                    test_engine.test_background_users_also_match_their_solo_runs(model)
                verdict = "identical"
            except AssertionError as exc:
                verdict = f"DIFFERENT ({_first_line(exc)})"
            except Exception as exc:  # noqa: BLE001 - report and go on
                verdict = f"error {type(exc).__name__}: {_first_line(exc)}"
            print(f"{model_name}, {dtype} | {name}: {verdict} ({time.perf_counter() - t:.1f} s)", flush=True)
    test_engine.CFG = base_cfg
    kv_cache.KV_BUCKET = bucket


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name() if DEV.type == "cuda" else DEV, flush=True)
    steps = {
        "linear": lambda: (linear_rows(torch.bfloat16), linear_rows(torch.float32)),
        "attention": lambda: (attention(torch.bfloat16), attention(torch.float32)),
        "engine": engine_crowd,
    }
    for name in sys.argv[1:] or list(steps):
        try:
            steps[name]()
        except Exception:  # noqa: BLE001 - one failed table must not hide the others
            traceback.print_exc()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
