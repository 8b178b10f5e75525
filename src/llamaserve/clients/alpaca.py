"""AlpacaEval over HTTP: the 800 instructions through the server, 32 in flight, one JSON file.

Unlike the original client (which appended one JSON array per batch, making the file invalid
JSON), the output is a single JSON array written once, failures included with their error.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from llamaserve.clients.common import END, failure_report, new_file, original_route, split_original_stream, sse_data


def load_instructions(path: str | Path | None = None) -> tuple[list[str], str]:
    """(instructions, where they came from): the same sources as `llamaserve demo-alpaca`
    (AlpacaEval from the `datasets` cache when present, else the set shipped with llamaserve)."""
    from llamaserve.clients.instructions import load_instructions as demo_instructions

    return demo_instructions(None if path is None else str(path))


@dataclass
class Record:
    response_idx: int
    instruction: str
    response: str | None = None
    ttft_ms: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    error: str | None = None


async def _one_original(client: httpx.AsyncClient, url: str, rec: Record, max_tokens: int, headers: dict) -> None:
    body = {"text": rec.instruction, "max_tokens": max_tokens, "temperature": 0.01, "top_k": 1, "top_p": 1.0}
    t0 = time.perf_counter()
    parts: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for chunk in r.aiter_text():
            if chunk and rec.ttft_ms is None:
                rec.ttft_ms = (time.perf_counter() - t0) * 1000
            parts.append(chunk)
            rec.tokens += 1  # one chunk per engine step, so this counts tokens (approximately)
    text = "".join(parts)
    if END not in text:
        raise RuntimeError("the stream ended without <|endoftext|>")
    rec.response, exact_tokens = split_original_stream(text)
    # Without the server's stats: one chunk per token, less the end marker's chunk.
    rec.tokens = exact_tokens if exact_tokens is not None else max(0, rec.tokens - 1)
    rec.elapsed_s = time.perf_counter() - t0


async def _one_openai(client: httpx.AsyncClient, url: str, rec: Record, max_tokens: int, headers: dict) -> None:
    body = {"messages": [{"role": "user", "content": rec.instruction}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    parts: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for obj in sse_data(r):
            for choice in obj.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if rec.ttft_ms is None:
                        rec.ttft_ms = (time.perf_counter() - t0) * 1000
                    parts.append(text)
            if obj.get("usage"):
                rec.tokens = obj["usage"]["completion_tokens"]
    rec.response = "".join(parts)
    rec.elapsed_s = time.perf_counter() - t0


async def run_eval(
    base_url: str,
    instructions: list[str],
    headers: dict[str, str],
    api: str = "original",
    concurrency: int = 32,
    max_tokens: int = 256,
    timeout: float = 600.0,
    progress: bool = True,
) -> list[Record]:
    base_url = base_url.rstrip("/")
    records = [Record(i, text) for i, text in enumerate(instructions)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if api == "openai":
            url, one = f"{base_url}/v1/chat/completions", _one_openai
        else:
            url, one = base_url + await original_route(client, base_url, headers), _one_original
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(records), desc="alpaca-eval", unit="req")
        sem = asyncio.Semaphore(concurrency)

        async def run_one(rec: Record) -> None:
            async with sem:
                try:
                    await one(client, url, rec, max_tokens, headers)
                except Exception as exc:  # noqa: BLE001 - recorded, never dropped
                    rec.error = f"{type(exc).__name__}: {exc}"
                    rec.response = None
                if rec.elapsed_s and rec.tokens:
                    rec.tokens_per_s = rec.tokens / rec.elapsed_s
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(run_one(r) for r in records))
        if bar is not None:
            bar.close()
    return records


def write_results(records: list[Record], output_dir: str | Path) -> Path:
    """A new responses_{timestamp}[_N].json: never an earlier run's file."""
    path = new_file(Path(output_dir) / f"responses_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([asdict(r) for r in records], indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path


def summary(records: list[Record], wall_s: float) -> str:
    ok = [r for r in records if r.error is None]
    failed = len(records) - len(ok)
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    tps = [r.tokens_per_s for r in ok if r.tokens_per_s]
    lines = [
        f"requests: {len(records)} ({len(ok)} ok, {failed} failed) in {wall_s:.1f} s",
        f"output tokens: {tokens}  ({tokens / wall_s:.1f} tokens/s overall)" if wall_s > 0 else "",
    ]
    if ttft:
        lines.append(f"time to first token: mean {sum(ttft) / len(ttft):.1f} ms")
    if tps:
        lines.append(f"tokens/s/user: mean {sum(tps) / len(tps):.2f}")
    lines += failure_report([(r.response_idx, r.error) for r in records if r.error is not None])
    return "\n".join(line for line in lines if line)
