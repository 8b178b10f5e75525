"""`llamaserve eval-alpaca`: the AlpacaEval instructions through a running server."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-alpaca",
        help="send the AlpacaEval instructions to a server and save the answers",
        description="Sends the AlpacaEval instructions (800 when the datasets cache has them, else the set shipped "
        "with llamaserve) to a llamaserve server, keeping --concurrency "
        "requests in flight, and writes one JSON array responses_{timestamp}.json. Auth: --token, "
        "$AUTHORIZATION ('Bearer ...'), or a token made from --secret / $JWT_SECRET.",
    )
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('SERVICE_PORT', '7000')}",
                   help="server base URL (default http://127.0.0.1:$SERVICE_PORT, port 7000 if unset; env SERVICE_PORT)")
    p.add_argument("--api", choices=["original", "openai"], default="original",
                   help="the original /inference route or /v1/chat/completions")
    p.add_argument("--limit", type=int, default=None, help="only the first N instructions")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most")
    p.add_argument("--instructions", default=None, help="JSON list of instructions (default: as demo-alpaca)")
    p.add_argument("--output-dir", default=None, help="where responses_*.json goes (default: $CACHE_ROOT, else the current directory; env CACHE_ROOT)")
    p.add_argument("--token", default=None, help="bearer token to send (env AUTHORIZATION='Bearer ...')")
    p.add_argument("--secret", default=None, help="mint a token with this HS256 secret (env JWT_SECRET)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from llamaserve.clients.alpaca import load_instructions, run_eval, summary, write_results
    from llamaserve.clients.common import auth_header

    try:
        instructions, source = load_instructions(ns.instructions)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the instructions: {exc}", file=sys.stderr)
        return 1
    if ns.limit is not None:
        if ns.limit < 1:
            print(f"error: --limit must be >= 1, got {ns.limit}", file=sys.stderr)
            return 1
        instructions = instructions[: ns.limit]
    print(f"{len(instructions)} instructions from {source} -> {ns.url}")
    t0 = time.perf_counter()
    records = asyncio.run(run_eval(ns.url, instructions, auth_header(ns.token, ns.secret), api=ns.api,
                                   concurrency=ns.concurrency, max_tokens=ns.max_tokens, timeout=ns.timeout,
                                   progress=not ns.no_progress))
    wall = time.perf_counter() - t0
    path = write_results(records, ns.output_dir or os.environ.get("CACHE_ROOT") or ".")
    print(summary(records, wall))
    print(f"wrote {path}")
    return 0 if all(r.error is None for r in records) else 1
