"""The OpenAI API's serving layer: parse -> submit -> collect or stream, without HTTP.

The routes (routes_openai.py) only authenticate, read the body, watch for the client leaving
and wrap the results in responses; everything the API decides happens here, and the wire format
is openai_format.py's pure functions.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from llamaserve.engine.request import RequestOutput
from llamaserve.server import openai_format as fmt
from llamaserve.server.errors import ENGINE_ERRORS, Api, EngineFailed, engine_error, openai_stream_error
from llamaserve.server.openai_limits import fit_max_tokens, reject_unsupported, wants_cap
from llamaserve.server.protocol import (
    ApiError,
    OpenAIRequest,
    bad,
    get_bool,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from llamaserve.server.quotas import NO_TEAM
from llamaserve.server.state import Generation, ServerState

_DONE = object()


@dataclass
class Submitted:
    """A request whose generations (n per prompt) have all started."""

    req: OpenAIRequest
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    gens: list[Generation]
    base: dict[str, Any] = field(default_factory=dict)

    async def aclose(self) -> None:
        for g in self.gens:
            await g.aclose()

    def usage(self) -> dict[str, int]:
        return fmt.usage(self.prompt_ids, sum(g.completion_tokens for g in self.gens))


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    # ---- parse -------------------------------------------------------------------------------
    def parse(self, body: bytes, chat: bool) -> OpenAIRequest:
        """The request, checked against this server (model name, readiness)."""
        req = (parse_chat if chat else parse_completion)(body)
        reject_unsupported(req.raw)  # what we do not implement is refused, never ignored
        if req.model is not None and req.model not in self.state.served_names():
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                                f"`{self.state.model_name}`.", param="model", type="NotFoundError",
                           code="model_not_found")
        self.state.check_ready()
        return req

    def prompt_ids(self, req: OpenAIRequest) -> list[list[int]]:
        tok = self.state.tokenizer
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
            self.state.check_prompt_fits(len(ids))
        return ids_list

    # ---- submit ------------------------------------------------------------------------------
    def generations(self, req: OpenAIRequest, ids_list: list[list[int]], team: str = NO_TEAM) -> list[Generation]:
        gens = []
        limit, cap = self.state.settings.engine.max_seq_len, wants_cap(req.raw)
        for ids in ids_list:
            params = req.params
            if not req.max_tokens_given and req.kind == "chat":
                params = replace(params, max_tokens=limit - len(ids))
            else:  # prompt + max_tokens beyond the context: 400, as OpenAI, unless capping is asked for
                fitted = fit_max_tokens(len(ids), params.max_tokens, limit, req.max_tokens_given, cap, req.kind == "chat")
                params = replace(params, max_tokens=fitted)
            for j in range(req.n):
                p = replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
                if p.seed is not None and req.n > 1:
                    p.seed = p.seed + j  # n samples from one seed must still differ
                gens.append(self.state.generation(ids, p, team))
        return gens

    async def submit(self, req: OpenAIRequest, team: str = NO_TEAM) -> Submitted:
        """Start every generation; engine refusals become ApiErrors (and nothing is left running)."""
        fan_out, limit = len(req.prompts) * req.n, self.state.settings.max_choices
        if fan_out > limit:
            raise bad(f"this request asks for {len(req.prompts)} prompt(s) x n={req.n} = {fan_out} completions; "
                      f"at most {limit} per request are accepted (--max-choices)",
                      "prompt" if len(req.prompts) > 1 else "n")
        ids_list = self.prompt_ids(req)
        gens = self.generations(req, ids_list, team)
        full = self.state.room_for(len(gens)) if len(gens) > 1 else None
        if full:  # all parts or none: one request must not fill the queue part by part
            raise ApiError(429, full, type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        try:
            self.state.admit(team, gens, req.max_tokens_given)
        except ENGINE_ERRORS as exc:
            raise engine_error(exc, Api.OPENAI) from None
        results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for g in gens:
                await g.aclose()
            if isinstance(errors[0], ENGINE_ERRORS):
                raise engine_error(errors[0], Api.OPENAI) from None
            raise errors[0]
        # The echoed prompts (decoded only when echoed: token-id prompts would cost a decode each).
        texts = [p if isinstance(p, str) else self.state.tokenizer.decode(ids)
                 for p, ids in zip(req.prompts, ids_list)] if req.echo else []
        return Submitted(req, ids_list, texts, gens, fmt.response_base(req.kind == "chat", self.state.model_name))

    # ---- collect / stream --------------------------------------------------------------------
    async def collect(self, sub: Submitted) -> dict[str, Any]:
        """The whole answer of a non-streamed request."""
        choices = [fmt.Choice() for _ in sub.gens]
        try:
            async for i, out in merged(sub.gens):
                choices[i].add(out)
        except EngineFailed as exc:
            raise engine_error(exc, Api.OPENAI) from None
        body = fmt.completion_choices(self.state.tokenizer, sub.req, choices, sub.prompt_ids, sub.prompt_texts)
        return {**sub.base, "choices": body, "usage": sub.usage()}

    async def stream(self, sub: Submitted) -> AsyncIterator[str]:
        """The server-sent events of a streamed request, [DONE] last (an error event instead
        when the engine fails mid-stream)."""
        req, tok = sub.req, self.state.tokenizer
        chat = req.kind == "chat"
        obj = fmt.chunk_base(sub.base, chat)
        for head in self._stream_head(sub, obj):
            yield head
        offsets = [len(sub.prompt_texts[i // req.n]) if req.echo and not chat else 0 for i in range(len(sub.gens))]
        try:
            async for i, out in merged(sub.gens):
                if chat:
                    lp = fmt.chat_logprobs(tok, out.logprobs or []) if req.logprobs is not None else None
                    choice = fmt.chat_delta(i, out, lp)
                else:
                    lp = fmt.completion_logprobs(tok, out.logprobs or [], offsets[i]) if req.logprobs is not None else None
                    choice = fmt.text_delta(i, out, lp)
                    offsets[i] += len(out.text_delta)
                if choice is not None:
                    yield fmt.stream_chunk(obj, [choice], req.include_usage)
        except EngineFailed as exc:
            yield openai_stream_error(exc)
            return
        if req.include_usage:
            yield f"data: {json.dumps({**obj, 'choices': [], 'usage': sub.usage()})}\n\n"
        yield fmt.SSE_DONE

    def _stream_head(self, sub: Submitted, obj: dict[str, Any]) -> list[str]:
        """Chat: the assistant role of every choice; completions with echo: each prompt."""
        req = sub.req
        if req.kind == "chat":
            return [fmt.stream_chunk(obj, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                            "finish_reason": None} for i in range(len(sub.gens))], req.include_usage)]
        if not req.echo:
            return []
        chunks = []
        for i, g in enumerate(sub.gens):
            pi = i // req.n
            text = sub.prompt_texts[pi]
            # start() has already received the first output, which carries the prompt's logprobs.
            lp = None
            if req.logprobs is not None:
                lp = fmt.prompt_logprobs(self.state.tokenizer, sub.prompt_ids[pi], g.first_output.prompt_logprobs or [],
                                         text)
            chunks.append(fmt.stream_chunk(obj, [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}],
                                           req.include_usage))
        return chunks

    # ---- the other endpoints -----------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        info = self.state.engine.info or {}
        name = self.state.model_name
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "llamaserve",
                "root": name, "parent": None, "max_model_len": self.state.settings.engine.max_seq_len,
                "builtin_random_weights": bool(info.get("is_builtin")), "mock": bool(info.get("is_mock"))}
        return {"object": "list", "data": [card]}

    def tokenize(self, body: bytes) -> dict[str, Any]:
        data = parse_json_object(body)
        self.state.check_ready()
        tok = self.state.tokenizer
        special = get_bool(data, "add_special_tokens", True)
        if "messages" in data:
            req = parse_chat(json.dumps({"messages": data["messages"]}).encode())
            try:
                ids = tok.encode_chat(req.prompts[0], add_generation_prompt=get_bool(data, "add_generation_prompt", True))
            except ValueError as exc:
                raise bad(str(exc), "messages") from None
        elif isinstance(data.get("prompt"), str):
            # A prompt that is exactly one special token's text is that token, as with vLLM's
            # tokenizers: how remote-tokenizer clients (lm-eval) learn bos/eos ids. Any other
            # text stays plain text, as in /v1/completions.
            single = tok.special_token_id(data["prompt"])
            ids = tok.encode(data["prompt"], bos=special) if single is None else [tok.bos_id] * special + [single]
        else:
            raise bad("'prompt' (a string) or 'messages' is required", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.state.settings.engine.max_seq_len}

    def detokenize(self, body: bytes) -> dict[str, Any]:
        data = parse_json_object(body)
        self.state.check_ready()
        ids = data.get("tokens")
        vocab = self.state.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise bad(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        return {"prompt": self.state.tokenizer.decode(ids)}


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
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
