"""Server overhead: the same 32 requests through the engine called directly, then through
`llamaserve serve` with 32 concurrent streaming HTTP clients (bench-serve's client).

Prints, per round, output tokens/s and time to first token (median) for both, then the medians
over rounds of the ratios the issue sets targets for (server >= 95% of direct tokens/s; < 5 ms
added median TTFT, measured one request at a time on an idle engine so that it is the server's
own cost), and the CPU time each process spent per output token.

    python benchmarks/server_vs_engine.py                 # built-in model
    python benchmarks/server_vs_engine.py --model mock --mock-step-delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def prompts_for(n: int, input_len: int, seed: int) -> list[str]:
    from llamaserve.clients.bench import make_prompt

    rng = random.Random(seed)
    return [make_prompt(input_len, rng) for _ in range(n)]


def direct_single_ttft(engine, tok, prompts: list[str]) -> float:
    """Median TTFT of one request at a time on an idle engine (what the server adds to)."""
    from llamaserve.engine.request import SamplingParams

    times = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        engine.add_request(f"single{i}", tok.encode(p, bos=True), SamplingParams(max_tokens=2, temperature=0))
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_ids and first is None:
                    first = time.perf_counter() - t0
        times.append(first)
    return statistics.median(times) * 1000


def served_single_ttft(url: str, prompts: list[str]) -> float:
    times = []
    with httpx.Client(timeout=300) as client:
        for p in prompts:
            t0 = time.perf_counter()
            with client.stream("POST", url + "/v1/completions",
                               json={"prompt": p, "max_tokens": 2, "temperature": 0, "stream": True}) as r:
                got = False
                for line in r.iter_lines():
                    if not got and line.startswith("data:") and '"text": ""' not in line:
                        times.append(time.perf_counter() - t0)
                        got = True
    return statistics.median(times) * 1000


class Direct:
    """The engine in this process, as the server's engine process builds it."""

    def __init__(self, engine_args) -> None:
        from llamaserve.engine.build import build_engine
        from llamaserve.engine.request import SamplingParams
        from llamaserve.tokenizer import load_tokenizer

        built = build_engine(engine_args, decode_only_tokenizer=True)
        self.engine = built.engine
        self.tok = load_tokenizer(built.info["tokenizer_dir"])
        # Warm-up: the first forward pays one-time costs the server has also paid before serving.
        self.engine.add_request("warm", self.tok.encode("warm up", bos=True), SamplingParams(max_tokens=2, temperature=0))
        while self.engine.has_unfinished():
            self.engine.step()

    def run(self, prompts: list[str], output_len: int, tag: str) -> dict:
        from llamaserve.engine.request import SamplingParams

        engine, tok = self.engine, self.tok
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", tok.encode(p, bos=True), params)
        first: dict[str, float] = {}
        tokens = 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_ids:
                    first.setdefault(out.request_id, time.perf_counter() - t0)
                    tokens += len(out.new_token_ids)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        single = direct_single_ttft(engine, tok, prompts[:16])
        return {"tok_s": tokens / wall, "ttft_ms": statistics.median(first.values()) * 1000, "tokens": tokens,
                "single_ttft_ms": single, "cpu": {"engine": cpu}}


class Served:
    """`llamaserve serve` in a subprocess, driven by bench-serve's client from this process."""

    def __init__(self, args) -> None:
        from server_fixtures import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "llamaserve", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-auth",
               "--max-users", str(args.users), "--max-seq-len", str(args.max_seq_len), "--log-level", "warning"]
        if args.model == "mock":
            cmd += ["--mock", "--mock-step-delay", str(args.mock_step_delay)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = url = f"http://127.0.0.1:{port}"
        self.args = args
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("server did not become healthy")
            time.sleep(0.2)
        # Same warm-up as the direct run.
        httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2, "temperature": 0}, timeout=300)

    def run(self, seed: int, output_len: int) -> dict:
        from llamaserve.clients.bench import run_bench

        args = self.args
        server = psutil.Process(self.proc.pid)
        procs = [server, *server.children()]
        before = _cpu(procs)
        c0 = time.process_time()
        rep = asyncio.run(run_bench(self.url, {}, num_prompts=args.users, concurrency=args.users,
                                    input_len=args.input_len, output_len=output_len, seed=seed))
        clients = time.process_time() - c0
        after = _cpu(procs)
        cpu = {"engine": sum(after[1:]) - sum(before[1:]), "server": after[0] - before[0], "clients": clients}
        if rep["failed"]:
            raise RuntimeError(f"failed requests: {rep['errors']}")
        single = served_single_ttft(self.url, prompts_for(args.users, args.input_len, seed)[:16])
        return {"tok_s": rep["output_throughput"], "ttft_ms": rep["ttft_ms"]["p50"],
                "tokens": rep["total_output_tokens"], "single_ttft_ms": single, "cpu": cpu}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _cpu(procs) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["builtin", "mock"], default="builtin")
    ap.add_argument("--mock-step-delay", type=float, default=0.02)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="direct and served runs alternate this many times")
    args = ap.parse_args()

    from llamaserve.engine.args import EngineArgs

    spec = EngineArgs(mock=args.model == "mock", mock_step_delay=args.mock_step_delay, max_users=args.users,
                      max_seq_len=args.max_seq_len)
    # Both sides stay up and take turns, so that a change in the machine's load between the
    # two halves (it is shared) shows as round-to-round spread rather than as a skewed ratio.
    direct = Direct(spec)
    served = Served(args)
    rounds = []
    try:
        for r in range(args.rounds):
            seed = args.seed + r
            d = direct.run(prompts_for(args.users, args.input_len, seed), args.output_len, f"r{r}")
            rounds.append((d, served.run(seed, args.output_len)))
    finally:
        served.close()

    print(f"model={args.model} users={args.users} input~{args.input_len} output={args.output_len} rounds={args.rounds}")
    print(f"{'':<10}{'tokens':>8}{'tokens/s':>12}{'TTFT p50 ms':>14}{'1-user TTFT p50 ms':>20}")
    for i, (d, s) in enumerate(rounds):
        for name, r in (("engine", d), ("server", s)):
            print(f"{name + ' ' + str(i):<10}{r['tokens']:>8}{r['tok_s']:>12.1f}{r['ttft_ms']:>14.1f}{r['single_ttft_ms']:>20.1f}")
    ratios = [s["tok_s"] / d["tok_s"] * 100 for d, s in rounds]
    added = [s["single_ttft_ms"] - d["single_ttft_ms"] for d, s in rounds]
    print("server/engine tokens/s per round: " + ", ".join(f"{x:.1f}%" for x in ratios)
          + f"   median {statistics.median(ratios):.1f}%")
    print("added TTFT, one request at a time (median of 16) per round: " + ", ".join(f"{x:+.1f}" for x in added)
          + f" ms   median {statistics.median(added):+.1f} ms")
    # On a shared CPU every process's work is taken from the model: where the cycles went.
    med = lambda side, key: statistics.median(r[side]["cpu"][key] / r[side]["tokens"] * 1e6 for r in  # noqa: E731
                                              ({"d": d, "s": s} for d, s in rounds))
    print(f"CPU us per output token (median): engine direct {med('d', 'engine'):.0f}; served: engine "
          f"{med('s', 'engine'):.0f}, server {med('s', 'server'):.0f}, clients {med('s', 'clients'):.0f}")


if __name__ == "__main__":
    main()
