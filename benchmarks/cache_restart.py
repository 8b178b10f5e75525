"""Time from `llamaserve serve` start to a healthy /health: cold (cache miss) vs warm (cache hit).

The first start converts the checkpoint (Hugging Face safetensors -> Meta layout, dtype, int8
when asked) and writes the converted-weight cache under CACHE_ROOT; the second memory-maps it.

    python benchmarks/make_model.py bench-out/model        # once: the ~272M benchmark model
    python benchmarks/cache_restart.py bench-out/model [--quantize int8] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_to_healthy(weights: str, cache_root: str, extra: list[str]) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "llamaserve", "serve", "--weights", weights, "--host", "127.0.0.1",
           "--port", str(port), "--no-auth", "--log-level", "warning", *extra]
    env = dict(os.environ, CACHE_ROOT=cache_root)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--runs", type=int, default=2, help="cold/warm pairs (each cold run starts from an empty cache)")
    p.add_argument("--max-seq-len", type=int, default=4096)
    ns = p.parse_args()
    extra = ["--quantize", ns.quantize, "--max-seq-len", str(ns.max_seq_len)]
    rows = []
    for _ in range(ns.runs):
        root = tempfile.mkdtemp(prefix="llamaserve-cache-bench-")
        try:
            cold = start_to_healthy(ns.weights, root, extra)
            warm = start_to_healthy(ns.weights, root, extra)
            cache_bytes = sum(f.stat().st_size for f in os.scandir(os.path.join(root, "llamaserve_weights"))
                              for f in os.scandir(f.path) if f.is_file()) if os.path.isdir(os.path.join(root, "llamaserve_weights")) else 0
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append((cold, warm, cache_bytes))
    print("| quantize | cold start (miss) s | warm start (hit) s | speed-up | cache size MiB |")
    print("|---|---|---|---|---|")
    for cold, warm, size in rows:
        print(f"| {ns.quantize} | {cold:.1f} | {warm:.1f} | {cold / warm:.1f}x | {size / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
