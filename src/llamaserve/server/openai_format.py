"""The OpenAI API's wire format, as pure functions of engine outputs and a tokenizer: response
bodies, stream chunks, logprobs objects, usage. No HTTP, no engine: unit-tested directly."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from llamaserve.engine.request import RequestOutput, TokenLogprob
from llamaserve.server.protocol import OpenAIRequest


class Choice:
    """What one generation produced, accumulated from its outputs."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text_delta)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = finish_reason(out)


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish_reason of an output: None until the last one."""
    if not out.finished:
        return None
    return out.finish_reason.value if out.finish_reason else "stop"


def response_base(chat: bool, model_name: str) -> dict[str, Any]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name}


def usage(ids_list: list[list[int]], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(ids) for ids in ids_list)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


# ---- logprobs ----------------------------------------------------------------------------------
def prompt_offsets(tokenizer, ids: list[int], text: str) -> list[int]:
    """Where each token of `ids` starts in `text`, their decoded text or its tail (a string
    prompt is echoed as sent, without the text of a leading BOS). A token that starts inside a
    multi-byte character counts from the start of that character."""
    from llamaserve.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer)
    starts, n = [], 0
    for t in ids:
        starts.append(n)
        n += len(detok.push(t))
    detok.flush()
    full = detok.text
    shift = len(full) - len(text) if full.endswith(text) else 0
    return [min(max(0, o - shift), len(text)) for o in starts]


def completion_logprobs(tokenizer, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy (completions) logprobs object; text_offset counts from `offset`."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        s = tokenizer.decode([lp.token_id])
        tokens.append(s)
        values.append(lp.logprob)
        tops.append({tokenizer.decode([t]): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(tokenizer, ids: list[int], lps: list[TokenLogprob | None], text: str) -> dict[str, Any]:
    """The legacy logprobs of an echoed prompt: the first token has null (nothing predicted
    it); text_offset is where each token starts in `text`, the echoed prompt."""
    return {
        "tokens": [tokenizer.decode([t]) for t in ids],
        "token_logprobs": [lp.logprob if lp is not None else None for lp in lps],
        "top_logprobs": [{tokenizer.decode([t]): v for t, v in lp.top} if lp is not None else None for lp in lps],
        "text_offset": prompt_offsets(tokenizer, ids, text),
    }


def echo_logprobs(tokenizer, req: OpenAIRequest, ids: list[int], text: str, plps, completion: list[TokenLogprob]):
    """Prompt then completion in one legacy logprobs object (None when not asked for)."""
    if req.logprobs is None:
        return None
    lp = completion_logprobs(tokenizer, completion, len(text))
    if plps is None:  # not echoed
        return lp
    head = prompt_logprobs(tokenizer, ids, plps, text)
    return {k: head[k] + lp[k] for k in head}


def chat_logprobs(tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(t: int, v: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([t]), "logprob": v, "bytes": list(tokenizer.decode_bytes([t]))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


# ---- whole responses ---------------------------------------------------------------------------
def completion_choices(tokenizer, req: OpenAIRequest, choices: list[Choice], prompt_ids: list[list[int]],
                       prompt_texts: list[str]) -> list[dict[str, Any]]:
    """The `choices` of a non-streamed answer; choice i answers prompt i // n."""
    out = []
    for i, c in enumerate(choices):
        text = "".join(c.text)
        if req.kind == "chat":
            lp = chat_logprobs(tokenizer, c.logprobs) if req.logprobs is not None else None
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": c.finish_reason})
            continue
        pi = i // req.n
        prefix = prompt_texts[pi] if req.echo else ""
        plps = c.prompt_logprobs if req.echo else None
        lp = echo_logprobs(tokenizer, req, prompt_ids[pi], prefix, plps, c.logprobs)
        out.append({"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": c.finish_reason})
    return out


# ---- streams -----------------------------------------------------------------------------------
def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk_base(base: dict[str, Any], chat: bool) -> dict[str, Any]:
    return {**base, "object": "chat.completion.chunk" if chat else "text_completion"}


def stream_chunk(obj: dict[str, Any], choices: list[dict], include_usage: bool, usage_value=None) -> str:
    """One chunk; with include_usage every chunk has `usage` (null until the last)."""
    body = {**obj, "choices": choices}
    if include_usage:
        body["usage"] = usage_value
    return sse(body)


def chat_delta(i: int, out: RequestOutput, lp) -> dict[str, Any] | None:
    """The chat chunk choice for one output, or None when it carries nothing to send."""
    finish = finish_reason(out)
    if not out.text_delta and finish is None and not out.logprobs:
        return None
    delta = {"content": out.text_delta} if out.text_delta or finish is None else {}
    return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}


def text_delta(i: int, out: RequestOutput, lp) -> dict[str, Any] | None:
    """The completion chunk choice for one output, or None when it carries nothing to send."""
    finish = finish_reason(out)
    if not out.text_delta and finish is None and not out.logprobs:
        return None
    return {"index": i, "text": out.text_delta, "logprobs": lp, "finish_reason": finish}
