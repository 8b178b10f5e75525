"""`llamaserve bench-serve`: load-test a running server like vLLM's serving benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-serve",
        help="load-test a running server: throughput, TTFT, TPOT, ITL",
        description="N concurrent streaming clients (or a Poisson request rate) against a llamaserve "
        "server; reports request and token throughput, time to first token, time per output token and "
        "inter-token latency (mean, p50, p90, p99), measured on the client side.",
    )
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('SERVICE_PORT', '7000')}",
                   help="server base URL (default http://127.0.0.1:$SERVICE_PORT, port 7000 if unset; env SERVICE_PORT)")
    p.add_argument("--api", choices=["openai", "original"], default="openai",
                   help="/v1/completions or the original /inference route")
    p.add_argument("--model", default=None, help="model name for the OpenAI API (default: the server's)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    p.add_argument("--concurrency", type=int, default=32, help="clients in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate (EOS ignored on the OpenAI API)")
    p.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths uniform in [len*ratio, len]; 1 = fixed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts, lengths and arrivals")
    p.add_argument("--token", default=None, help="bearer token to send (env AUTHORIZATION='Bearer ...')")
    p.add_argument("--secret", default=None, help="mint a token with this HS256 secret (env JWT_SECRET)")
    p.add_argument("--result-file", default=None, help="also write the results as JSON (name_2.json, ... if the file exists; never overwritten)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from llamaserve.clients.bench import format_report, run_bench
    from llamaserve.clients.common import auth_header

    rep = asyncio.run(run_bench(ns.url, auth_header(ns.token, ns.secret), num_prompts=ns.num_prompts,
                                concurrency=ns.concurrency, request_rate=ns.request_rate, input_len=ns.input_len,
                                output_len=ns.output_len, range_ratio=ns.random_range_ratio, api=ns.api,
                                model=ns.model, seed=ns.seed))
    print(format_report(rep))
    if ns.result_file:
        from llamaserve.clients.common import new_file

        path = new_file(ns.result_file)  # an earlier run's file is never overwritten
        with open(path, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {path}")
    return 0 if rep["failed"] == 0 else 1
