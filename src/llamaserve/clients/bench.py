"""A serving load generator in the manner of vLLM's benchmark_serving: N concurrent streaming
clients (or a Poisson arrival rate), fixed or random prompt/output lengths; client-side time to
first token, time per output token, inter-token latency, throughput."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from llamaserve.clients.common import (END, failure_report, original_route, split_original_stream, sse_data,
                                       summarize)

# Common short English words: any Llama tokenizer encodes each as one token (with its space).
_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
          "had by word but not what all were we when your can said there use an each which she do how their "
          "if will up other about out many then them these so some her would make like him into time has look "
          "two more write go see number no way could people my than first water been call who oil its now find").split()


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None


def make_lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    """Fixed lengths (ratio 1) or uniform in [mean*ratio, mean]... like vLLM's --random-range-ratio."""
    if ratio >= 1.0:
        return [mean] * n
    lo = max(1, int(mean * ratio))
    return [rng.randint(lo, mean) for _ in range(n)]


def make_prompt(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


async def _openai_request(client, url, model, prompt, max_tokens, headers) -> Result:
    res = Result(ok=False, prompt_len=0)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = last = time.perf_counter()
    async with _sse_stream(client, url, body, headers) as (status, events):
        if status != 200:
            res.error = f"HTTP {status}: {(b''.join([e async for e in events])).decode(errors='replace')[:200]}"
            return res
        async for obj in events:
            now = time.perf_counter()
            if any(c.get("text") for c in obj.get("choices", [])):
                if res.ttft is None:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
            if obj.get("usage"):
                res.output_tokens = obj["usage"]["completion_tokens"]
                res.prompt_len = obj["usage"]["prompt_tokens"]
    res.latency = time.perf_counter() - t0
    res.ok = True
    return res


@contextlib.asynccontextmanager
async def _sse_stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str]):
    """(status, events): the JSON objects of an OpenAI stream, or the raw error body in pieces.

    Plain-http URLs are read with a minimal HTTP/1.1 reader on asyncio streams: a load
    generator shares the machine with the server it measures, and httpx's layers cost ~150 us
    of CPU per streamed token, several times what the server spends on it (https goes
    through httpx)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                yield r.status_code, r.aiter_bytes()
            else:
                yield 200, sse_data(r)
        return
    data = json.dumps(body).encode()
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n{head}\r\n").encode() + data
    async with asyncio.timeout(client.timeout.read):  # httpx's timeout, here for the whole request
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            writer.write(request)
            status_line = await reader.readline()
            try:
                status = int(status_line.split()[1])
            except (IndexError, ValueError):
                raise RuntimeError(f"not an HTTP response: {status_line[:80]!r}") from None
            chunked = False
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            payload = _chunked_body(reader) if chunked else _plain_body(reader)
            yield status, (_sse_events(payload) if status == 200 else payload)
        finally:
            writer.close()


async def _plain_body(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data


async def _chunked_body(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)  # the chunk and its CRLF
        yield data[:-2]


async def _sse_events(payload: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """sse_data() for raw bytes: `data:` lines up to [DONE]; an error object raises."""
    buf = b""
    async for piece in payload:
        buf += piece
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"].get("message", "server error"))
            yield obj


async def _original_request(client, url, model, prompt, max_tokens, headers) -> Result:
    res = Result(ok=False, prompt_len=len(prompt.split()))
    body = {"text": prompt, "max_tokens": max_tokens, "temperature": 0.01, "top_k": 1, "top_p": 1.0}
    t0 = last = time.perf_counter()
    chunks = 0
    text = ""
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            return res
        ended = False
        async for chunk in r.aiter_text():
            now = time.perf_counter()
            text += chunk
            if ended or END in text:
                ended = True  # what follows is the optional stats object
                continue
            if res.ttft is None:
                res.ttft = now - t0
            else:
                res.itls.append(now - last)
            last = now
            chunks += 1
    exact_tokens = split_original_stream(text)[1]  # the server's stats, when it sends them
    res.output_tokens = exact_tokens if exact_tokens is not None else chunks  # else one chunk per step
    res.latency = time.perf_counter() - t0
    res.ok = True
    return res


async def run_bench(
    base_url: str,
    headers: dict[str, str],
    num_prompts: int = 64,
    concurrency: int = 32,
    request_rate: float = float("inf"),
    input_len: int = 128,
    output_len: int = 128,
    range_ratio: float = 1.0,
    api: str = "openai",
    model: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    rng = random.Random(seed)
    base_url = base_url.rstrip("/")
    in_lens = make_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = make_lengths(num_prompts, output_len, range_ratio, rng)
    prompts = [make_prompt(n, rng) for n in in_lens]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if api == "openai":
            url, send = f"{base_url}/v1/completions", _openai_request
        else:
            url, send = base_url + await original_route(client, base_url, headers), _original_request
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Result:
            async with sem:
                try:
                    return await send(client, url, model, prompts[i], out_lens[i], headers)
                except Exception as exc:  # noqa: BLE001 - counted as a failure
                    return Result(ok=False, prompt_len=in_lens[i], error=f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        tasks = []
        for i in range(num_prompts):
            tasks.append(asyncio.create_task(one(i)))
            if request_rate != float("inf") and i < num_prompts - 1:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return report(results, wall, concurrency, request_rate)


def report(results: list[Result], wall: float, concurrency: int, request_rate: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": [(i, r.error) for i, r in enumerate(results) if r.error],
        "duration_s": wall,
        "concurrency": concurrency,
        "request_rate": request_rate,
        "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "output_throughput": out_tokens / wall if wall > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "tokens_per_s_per_user": summarize([r.output_tokens / r.latency for r in ok if r.latency > 0])["mean"],
        "ttft_ms": {k: v * 1000 for k, v in summarize([r.ttft for r in ok if r.ttft is not None]).items()},
        "tpot_ms": {k: v * 1000 for k, v in summarize(tpots).items()},
        "itl_ms": {k: v * 1000 for k, v in summarize([x for r in ok for x in r.itls]).items()},
    }


def format_report(rep: dict) -> str:
    lines = [
        f"{'successful requests':<32}{rep['completed']}",
        f"{'failed requests':<32}{rep['failed']}",
        f"{'duration (s)':<32}{rep['duration_s']:.2f}",
        f"{'request throughput (req/s)':<32}{rep['request_throughput']:.2f}",
        f"{'output token throughput (tok/s)':<32}{rep['output_throughput']:.2f}",
        f"{'tokens/s/user (mean)':<32}{rep['tokens_per_s_per_user']:.2f}",
    ]
    for key, title in (("ttft_ms", "time to first token"), ("tpot_ms", "time per output token"),
                       ("itl_ms", "inter-token latency")):
        s = rep[key]
        lines.append(f"{title + ' (ms)':<32}mean {s['mean']:.2f}  p50 {s['p50']:.2f}  p90 {s['p90']:.2f}  p99 {s['p99']:.2f}")
    lines += failure_report([tuple(e) for e in rep["errors"]])
    return "\n".join(lines)
