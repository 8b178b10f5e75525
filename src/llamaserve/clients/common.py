"""What the HTTP clients share: the Authorization header, stream readers, and statistics."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import AsyncIterator

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
