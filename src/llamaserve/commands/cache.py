"""`llamaserve cache build|verify|list|clear`: the converted-weight cache under CACHE_ROOT."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="build, verify, list or clear the converted-weight cache",
        description="Converted weights (dtype, int8, tensor-parallel slices) live under "
        "{CACHE_ROOT}/llamaserve_weights/; the first load builds them, later loads memory-map them.",
    )
    p.add_argument("action", choices=("build", "verify", "list", "clear"), help="build an entry, verify every entry's files, list or clear them")
    p.add_argument("--cache-root", default=os.environ.get("CACHE_ROOT"), help="cache root (env CACHE_ROOT; required one way or the other)")
    p.add_argument(
        "--model",
        default=os.environ.get("MODEL_WEIGHTS_PATH") or None,
        help="checkpoint directory to build for (env MODEL_WEIGHTS_PATH; default: the built-in model)",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--quantize", choices=("none", "int8", "int4", "fp8"), default="none",
                   help="int8 (per channel) or int4 (groups of 64) weight-only quantisation, or fp8 (e4m3 per channel)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="build the slices of N ranks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from llamaserve.model.parallel import TensorParallel
    from llamaserve.weights import cache

    if not ns.cache_root:
        print("error: no cache root: pass --cache-root or set CACHE_ROOT", file=sys.stderr)
        return 2
    if ns.action == "list":
        for entry in cache.list_entries(ns.cache_root):
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            print(f"{entry.name}\t{size / 2**20:.1f} MiB")
        return 0
    if ns.action == "clear":
        n = cache.clear(ns.cache_root)
        print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {cache.cache_dir(ns.cache_root)}")
        return 0
    if ns.action == "verify":
        results = cache.verify(ns.cache_root)
        bad = [(e, problem) for e, problem in results if problem]
        for entry, problem in results:
            print(f"{'BAD' if problem else 'ok '}\t{entry.name}" + (f"\t{problem}" if problem else ""))
        print(f"{len(results) - len(bad)} ok, {len(bad)} bad")
        return 1 if bad else 0

    try:
        dtype = cache.parse_dtype(ns.dtype)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.tensor_parallel < 1:
        print(f"error: --tensor-parallel must be >= 1, got {ns.tensor_parallel}", file=sys.stderr)
        return 2
    from llamaserve.weights.errors import WeightsError

    try:
        for rank in range(ns.tensor_parallel):
            tp = TensorParallel(ns.tensor_parallel, rank)
            entry, _, _, _ = cache.ensure_entry(ns.model, ns.cache_root, dtype, tp, ns.quantize, not ns.no_progress)
            print(f"ready\t{entry}")
    except (WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
