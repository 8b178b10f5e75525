"""Time from `llamaserve serve` start to a healthy /health: cold (cache miss) vs warm (cache hit).

The first start converts the checkpoint (Hugging Face safetensors or Meta shards -> the engine's
layout, dtype, int8 when asked) and writes the converted-weight cache and the engine's token table
under CACHE_ROOT; the second memory-maps the weights and reads the table. Each cold start begins
with an empty CACHE_ROOT; the source files are read once before timing so that both starts find
them in the page cache (what a restart on a serving machine sees).

    python benchmarks/make_model.py bench-out/model        # once: the ~272M benchmark model
    python benchmarks/cache_restart.py bench-out/model [--quantize int8] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

POLL_S = 0.025


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_once(weights: str) -> None:
    """Bring the checkpoint into the page cache, so the first cold start is not also a cold disk."""
    for entry in os.scandir(weights):
        if entry.is_file() and not entry.name.endswith(".gguf"):  # llama.cpp's copy is never read
            with open(entry.path, "rb") as f:
                while f.read(1 << 24):
                    pass


def start_to_healthy(weights: str, cache_root: str, extra: list[str]) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "llamaserve", "serve", "--weights", weights, "--host", "127.0.0.1",
           "--port", str(port), "--no-auth", "--log-level", "warning", *extra]
    env = dict(os.environ, CACHE_ROOT=cache_root)
    # One client for all polls: a new httpx client per poll costs the 2-core box several ms of
    # CPU that the starting server needs.
    client = httpx.Client(timeout=1)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
    finally:
        client.close()
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
    read_once(ns.weights)
    for _ in range(ns.runs):
        root = tempfile.mkdtemp(prefix="llamaserve-cache-bench-")
        try:
            cold = start_to_healthy(ns.weights, root, extra)
            warm = start_to_healthy(ns.weights, root, extra)
            weights_dir = os.path.join(root, "llamaserve_weights")
            cache_bytes = sum(f.stat().st_size for e in os.scandir(weights_dir) for f in os.scandir(e.path)
                              if f.is_file()) if os.path.isdir(weights_dir) else 0
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append((cold, warm, cache_bytes))
    source = os.path.basename(os.path.normpath(ns.weights))
    print("| source | quantize | cold start (miss) s | warm start (hit) s | speed-up | cache size MiB |")
    print("|---|---|---|---|---|---|")
    for cold, warm, size in rows:
        print(f"| {source} | {ns.quantize} | {cold:.2f} | {warm:.2f} | {cold / warm:.1f}x | {size / 2**20:.0f} |")
    if len(rows) > 1:
        cold, warm = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"| **median of {len(rows)}** | {ns.quantize} | **{cold:.2f}** | **{warm:.2f}** | **{cold / warm:.1f}x** | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
