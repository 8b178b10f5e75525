"""What the HTTP clients share: the Authorization header, stream readers, and statistics."""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

END = "<|endoftext|>"


def auth_header(token: str | None = None, secret: str | None = None) -> dict[str, str]:
    """Flags before the environment: --token, a token minted from --secret, $AUTHORIZATION
    ("Bearer ..."), then a token minted from $JWT_SECRET."""
    if token:
        return {"Authorization": token if token.lower().startswith("bearer ") else f"Bearer {token}"}
    if not secret and os.environ.get("AUTHORIZATION"):
        return {"Authorization": os.environ["AUTHORIZATION"]}
    secret = secret or os.environ.get("JWT_SECRET")
    if secret:
        from llamaserve.server.auth import DEFAULT_PAYLOAD, encode_token

        return {"Authorization": f"Bearer {encode_token(DEFAULT_PAYLOAD, secret)}"}
    return {}


def split_original_stream(text: str) -> tuple[str, int | None]:
    """The response text of an original-route stream, and its generated-token count when the
    server appended user stats (`--send-user-stats`), else None."""
    pieces = text.split(END)
    if len(pieces) >= 3:
        try:
            stats = json.loads(pieces[1])
            return pieces[0], int(stats["context_length"]) - int(stats["prefill_tokens"])
        except (ValueError, KeyError, TypeError):
            pass
    return pieces[0], None


async def original_route(client: httpx.AsyncClient, base_url: str, headers: dict | None = None) -> str:
    """The server's /inference/<name> route (llama2-70b or llama3-70b), from /status when it has
    one (it needs the token)."""
    try:
        r = await client.get(f"{base_url}/status", headers=headers)
        if r.status_code == 200 and "route" in r.json():
            return r.json()["route"]
    except (httpx.HTTPError, ValueError):
        pass
    return "/inference/llama3-70b"


async def sse_data(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON objects of an OpenAI-style stream, up to `data: [DONE]`; an error object raises."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(obj["error"].get("message", "server error"))
        yield obj


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


_HTTP_STATUS = re.compile(r"^(?:\w+: )?(HTTP \d{3})\b")


def failure_reason(error: str) -> str:
    """The kind of a failure, for counting: "HTTP 503", "ReadTimeout", ... (the status, else the
    text up to the first colon; the rest is detail)."""
    m = _HTTP_STATUS.match(error)
    return m.group(1) if m else (error.split(":", 1)[0].strip() or error)


def failure_report(errors: list[tuple[int, str]], first: int = 3) -> list[str]:
    """Lines that say why requests failed: the first few with their request number and whole
    reason, then how many failed for each reason."""
    if not errors:
        return []
    lines = [f"failed #{i}: {err}" for i, err in errors[:first]]
    if len(errors) > first:
        lines.append(f"... and {len(errors) - first} more failed")
    counts = Counter(failure_reason(err) for _, err in errors)
    lines.append("failures by reason: " + ", ".join(f"{n} x {why}" for why, n in counts.most_common()))
    return lines


def new_file(path: str | Path) -> Path:
    """`path`, or `name_2.ext`, `name_3.ext`... if taken: created empty and exclusively, so an
    earlier results file is never overwritten, even by a run started in the same second."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            n += 1
