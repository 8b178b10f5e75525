"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, plus vLLM's
/tokenize and /detokenize. Errors are `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llamaserve.engine.request import RequestOutput, TokenLogprob
from llamaserve.server.protocol import (
    ApiError,
    OpenAIRequest,
    bad,
    get_bool,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from llamaserve.server.errors import ENGINE_ERRORS, Api, EngineFailed, engine_error, openai_error, openai_stream_error
from llamaserve.server.state import ClientGone, Generation, ServerState, unless_disconnected
from llamaserve.server.streaming import DisconnectAwareStreamingResponse

_DONE = object()


async def _start_all(gens: list[Generation]) -> None:
    results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for g in gens:
            await g.aclose()
        raise errors[0]


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several generations as they come, tagged with the generation's index."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for out in g:
                q.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            q.put_nowait((i, exc))
        finally:
            q.put_nowait((i, _DONE))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await q.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.tokens = 0


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def token_str(tid: int) -> str:
        return state.tokenizer.decode([tid])

    def token_bytes(tid: int) -> list[int]:
        return list(state.tokenizer.decode_bytes([tid]))

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            s = token_str(lp.token_id)
            tokens.append(s)
            values.append(lp.logprob)
            tops.append({token_str(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs(ids: list[int], lps: list[TokenLogprob | None], text: str) -> dict[str, Any]:
        """The legacy logprobs of an echoed prompt: the first token has null (nothing predicted
        it); text_offset is where each token starts in `text`, the echoed prompt."""
        offsets = prompt_offsets(state.tokenizer, ids, text)
        return {
            "tokens": [token_str(t) for t in ids],
            "token_logprobs": [lp.logprob if lp is not None else None for lp in lps],
            "top_logprobs": [{token_str(t): v for t, v in lp.top} if lp is not None else None for lp in lps],
            "text_offset": offsets,
        }

    def echo_logprobs(req: OpenAIRequest, ids: list[int], text: str, plps, completion: list[TokenLogprob]):
        """Prompt then completion in one legacy logprobs object (None when not asked for)."""
        if req.logprobs is None:
            return None
        lp = completion_logprobs(completion, len(text))
        if plps is None:  # not echoed
            return lp
        head = prompt_logprobs(ids, plps, text)
        return {k: head[k] + lp[k] for k in head}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [
            {"token": token_str(lp.token_id), "logprob": lp.logprob, "bytes": token_bytes(lp.token_id),
             "top_logprobs": [{"token": token_str(t), "logprob": v, "bytes": token_bytes(t)} for t, v in lp.top]}
            for lp in lps
        ]}

    def check_model(req: OpenAIRequest) -> None:
        if req.model is not None and req.model not in state.served_names():
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{state.model_name}`.",
                           param="model", type="NotFoundError", code="model_not_found")

    def prompt_ids(req: OpenAIRequest) -> list[list[int]]:
        tok = state.tokenizer
        if req.kind == "chat":
            try:
                ids_list = [tok.encode_chat(req.prompts[0], add_generation_prompt=True)]
            except ValueError as exc:  # the chat format's own rules (order of roles, ...)
                raise bad(str(exc), "messages") from None
        else:
            ids_list = []
            for p in req.prompts:
                if isinstance(p, str):
                    ids_list.append(tok.encode(p, bos=True))
                else:
                    if max(p) >= tok.vocab_size:
                        raise bad(f"'prompt' holds token id {max(p)}, outside the vocabulary of {tok.vocab_size}", "prompt")
                    ids_list.append(list(p))
        for ids in ids_list:
            state.check_prompt_fits(len(ids))
        return ids_list

    async def prepare(request: Request, parse) -> tuple[OpenAIRequest, list[list[int]], list[Generation]]:
        state.authenticate(request)
        req = parse(await state.read_body(request))
        check_model(req)
        state.check_ready()
        ids_list = prompt_ids(req)
        gens = []
        for ids in ids_list:
            params = req.params
            if not req.max_tokens_given and req.kind == "chat":
                params = replace(params, max_tokens=state.settings.engine.max_seq_len - len(ids))
            for j in range(req.n):
                p = replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
                if p.seed is not None and req.n > 1:
                    p.seed = p.seed + j  # n samples from one seed must still differ
                gens.append(state.generation(ids, p))
        try:
            await unless_disconnected(request, _start_all(gens))
        except ENGINE_ERRORS as exc:
            raise engine_error(exc, Api.OPENAI) from None
        return req, ids_list, gens

    def prompt_text(req: OpenAIRequest, i: int, ids: list[int]) -> str:
        p = req.prompts[i]
        return p if isinstance(p, str) else state.tokenizer.decode(ids)

    def usage(ids_list: list[list[int]], gens: list[Generation]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in ids_list)
        completion = sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def handle(request: Request, parse) -> Response:
        try:
            req, ids_list, gens = await prepare(request, parse)
        except ApiError as exc:
            return openai_error(exc)
        except ClientGone:
            return Response(status_code=499)
        chat = req.kind == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": state.model_name}

        async def close_all() -> None:
            for g in gens:
                await g.aclose()

        if req.stream:
            return DisconnectAwareStreamingResponse(
                stream(req, ids_list, gens, base), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"}, on_close=close_all)
        try:
            choices = await unless_disconnected(request, collect(gens))
        except ClientGone:
            return Response(status_code=499)
        except EngineFailed as exc:
            return openai_error(engine_error(exc, Api.OPENAI))
        out_choices = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            if chat:
                lp = chat_logprobs(c.logprobs) if req.logprobs is not None else None
                out_choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                pi = i // req.n
                prefix = prompt_text(req, pi, ids_list[pi]) if req.echo else ""
                plps = c.prompt_logprobs if req.echo else None
                lp = echo_logprobs(req, ids_list[pi], prefix, plps, c.logprobs)
                out_choices.append({"index": i, "text": prefix + text, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
        return JSONResponse({**base, "choices": out_choices, "usage": usage(ids_list, gens)})

    async def collect(gens: list[Generation]) -> list[_Choice]:
        choices = [_Choice() for _ in gens]
        async for i, out in _merged(gens):
            c = choices[i]
            c.text.append(out.text_delta)
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            if out.logprobs:
                c.logprobs.extend(out.logprobs)
            if out.finished:
                c.finish_reason = out.finish_reason.value if out.finish_reason else "stop"
        return choices

    async def stream(req: OpenAIRequest, ids_list, gens, base) -> AsyncIterator[str]:
        chat = req.kind == "chat"
        obj = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices: list[dict], usage_value=None) -> str:
            body = {**obj, "choices": choices}
            if req.include_usage:
                body["usage"] = usage_value
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        offsets = [0] * len(gens)
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(gens))])
        elif req.echo:
            for i, g in enumerate(gens):
                pi = i // req.n
                text = prompt_text(req, pi, ids_list[pi])
                offsets[i] = len(text)
                # start() has already received the first output, which carries the prompt's logprobs.
                lp = None
                if req.logprobs is not None:
                    lp = prompt_logprobs(ids_list[pi], g.first_output.prompt_logprobs or [], text)
                yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])
        try:
            async for i, out in _merged(gens):
                finish = (out.finish_reason.value if out.finish_reason else "stop") if out.finished else None
                if not out.text_delta and finish is None and not out.logprobs:
                    continue
                if chat:
                    lp = chat_logprobs(out.logprobs or []) if req.logprobs is not None else None
                    delta = {"content": out.text_delta} if out.text_delta or finish is None else {}
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}])
                else:
                    lp = completion_logprobs(out.logprobs or [], offsets[i]) if req.logprobs is not None else None
                    offsets[i] += len(out.text_delta)
                    yield chunk([{"index": i, "text": out.text_delta, "logprobs": lp, "finish_reason": finish}])
        except EngineFailed as exc:
            yield openai_stream_error(exc)
            return
        if req.include_usage:
            yield f"data: {json.dumps({**obj, 'choices': [], 'usage': usage(ids_list, gens)})}\n\n"
        yield "data: [DONE]\n\n"

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, parse_completion)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, parse_chat)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            state.authenticate(request)
        except ApiError as exc:
            return openai_error(exc)
        info = state.engine.info or {}
        card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "llamaserve",
                "root": state.model_name, "parent": None, "max_model_len": state.settings.engine.max_seq_len,
                "builtin_random_weights": bool(info.get("is_builtin")), "mock": bool(info.get("is_mock"))}
        return JSONResponse({"object": "list", "data": [card]})

    @router.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            state.authenticate(request)
            data = parse_json_object(await state.read_body(request))
            state.check_ready()
            tok = state.tokenizer
            special = get_bool(data, "add_special_tokens", True)
            if "messages" in data:
                req = parse_chat(json.dumps({"messages": data["messages"]}).encode())
                try:
                    ids = tok.encode_chat(req.prompts[0],
                                          add_generation_prompt=get_bool(data, "add_generation_prompt", True))
                except ValueError as exc:
                    raise bad(str(exc), "messages") from None
            elif isinstance(data.get("prompt"), str):
                ids = tok.encode(data["prompt"], bos=special)
            else:
                raise bad("'prompt' (a string) or 'messages' is required", "prompt")
        except ApiError as exc:
            return openai_error(exc)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.settings.engine.max_seq_len})

    @router.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        try:
            state.authenticate(request)
            data = parse_json_object(await state.read_body(request))
            state.check_ready()
            ids = data.get("tokens")
            vocab = state.tokenizer.vocab_size
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise bad(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        except ApiError as exc:
            return openai_error(exc)
        return JSONResponse({"prompt": state.tokenizer.decode(ids)})

    return router
