"""Request bodies of both APIs: parse, check types and bounds, build SamplingParams.

Validation is explicit (not a schema library) so every message names the parameter and says
what was wrong, in the words each API's clients expect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.request import InvalidRequest, SamplingParams


class ApiError(Exception):
    """An error answer: HTTP status, message, and (OpenAI routes) type/param/code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


MAX_JSON_DEPTH = 64  # no field of either API nests deeper than a few levels
MAX_INT_DIGITS = 40  # beyond any token id, seed or count; Python refuses > 4300 with a ValueError


def _parse_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise bad(f"request body holds an integer of {len(literal)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(literal)


def _check_structure(data: Any) -> None:
    """Refuses nesting deeper than MAX_JSON_DEPTH and strings with a lone UTF-16 surrogate
    (JSON's "\\ud800" escape decodes to one; it cannot be encoded as UTF-8, so echoing it back
    would break a stream mid-answer). Iterative: the check itself must not recurse."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                where = f"'{path}'" if path else "the request body"
                raise bad(f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                          f"which is not valid Unicode", path.split("[")[0].split(".")[0] or None) from None
            continue
        if isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise bad(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    stack.append((key, path, depth + 1))  # keys are text too
                    sub = f"{path}.{key}" if path else key
                else:
                    sub = f"{path}[{key}]"
                stack.append((item, sub, depth + 1))


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_structure(data)
    if not isinstance(data, dict):
        raise bad(f"request body must be a JSON object, got {type(data).__name__}")
    return data


_MISSING = object()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get_number(
    body: dict,
    name: str,
    default: Any,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    """A number field; JSON null means the default."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    kind = "an integer" if integer else "a number"
    if not _is_number(v) or (integer and not (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))):
        raise bad(f"'{name}' must be {kind}, got {json.dumps(v)}", name)
    if not math.isfinite(v):
        raise bad(f"'{name}' must be finite, got {v}", name)
    if integer:
        v = int(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{name}' must be {'greater than' if lo_open else 'at least'} {lo:g}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be at most {hi:g}, got {v}", name)
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean (true or false), got {json.dumps(v)}", name)
    return v


MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_TOKEN_IDS = 256


def get_stop(body: dict, name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []  # null means no stop string (the original turned it into the text "None")
    if isinstance(v, str):
        stops = [v] if v else []
    elif isinstance(v, list) and all(isinstance(s, str) for s in v):
        stops = [s for s in v if s]
    else:
        raise bad(f"'{name}' must be a string or a list of strings, got {json.dumps(v)[:100]}", name)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'{name}' holds {len(stops)} stop strings; at most {MAX_STOP_STRINGS} are accepted", name)
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad(f"'{name}' holds a stop string of {longest} characters; at most {MAX_STOP_CHARS} are accepted", name)
    return stops


# ---- the original API -----------------------------------------------------------------------


@dataclass
class OriginalRequest:
    text: str
    params: SamplingParams
    return_prompt: bool
    max_tokens_given: bool = False


def parse_original(body: bytes) -> OriginalRequest:
    """The body of POST /inference/<model> and /chat/<model> (SPEC section 2)."""
    data = parse_json_object(body)
    text = data.get("text", _MISSING)
    if text is _MISSING or text is None:
        raise bad("missing required parameter 'text'", "text")
    if not isinstance(text, str):
        raise bad(f"'text' must be a string, got {type(text).__name__}", "text")
    if not text.strip():
        raise bad("'text' must not be empty", "text")
    params = SamplingParams(
        temperature=get_number(data, "temperature", 1.0, lo=0.01, hi=100),
        top_p=get_number(data, "top_p", 0.9, lo=0.01, hi=1.0),
        top_k=get_number(data, "top_k", 10, integer=True, lo=1, hi=1000),
        max_tokens=get_number(data, "max_tokens", 1024, integer=True, lo=1, hi=2048),
        stop=get_stop(data, "stop_sequence"),
    )
    return OriginalRequest(text=text, params=params, return_prompt=get_bool(data, "return_prompt", False),
                           max_tokens_given=data.get("max_tokens") is not None)


# ---- the OpenAI API -------------------------------------------------------------------------


@dataclass
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str | None
    prompts: list[Any]  # completion: str or list[int] each; chat: one list of messages
    params: SamplingParams
    max_tokens_given: bool
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # number of alternatives, None = off
    raw: dict = field(default_factory=dict)


MAX_N = 16


def _common_params(
    data: dict, max_tokens_default: int, max_tokens_names: tuple[str, ...], prompt_logprobs: int | None = None
) -> tuple[SamplingParams, bool]:
    max_tokens, given = max_tokens_default, False
    for name in max_tokens_names:
        v = get_number(data, name, None, integer=True, lo=0 if prompt_logprobs is not None else 1)
        if v is not None:
            max_tokens, given = v, True
            break
    top_k = get_number(data, "top_k", 0, integer=True, lo=-1)
    seed = get_number(data, "seed", None, integer=True)
    stop_token_ids = data.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
        raise bad("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad(f"'stop_token_ids' holds {len(stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are accepted",
                  "stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=get_number(data, "temperature", 1.0, lo=0, hi=2),
        top_p=get_number(data, "top_p", 1.0, lo=0, lo_open=True, hi=1),
        top_k=0 if top_k == -1 else top_k,
        min_p=get_number(data, "min_p", 0.0, lo=0, hi=1),
        presence_penalty=get_number(data, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=get_number(data, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=get_number(data, "repetition_penalty", 1.0, lo=0, lo_open=True),
        seed=seed,
        stop=get_stop(data, "stop"),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=get_bool(data, "ignore_eos", False),
        prompt_logprobs=prompt_logprobs,
    )
    try:
        params.validate()
    except InvalidRequest as exc:
        raise bad(str(exc), exc.param) from None
    return params, given


def _model_and_stream(data: dict) -> tuple[str | None, int, bool, bool]:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    n = get_number(data, "n", 1, integer=True, lo=1, hi=MAX_N)
    stream = get_bool(data, "stream", False)
    opts = data.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = get_bool(opts, "include_usage", False)
    return model, n, stream, include_usage


def parse_completion(body: bytes) -> OpenAIRequest:
    data = parse_json_object(body)
    prompt = data.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise bad("missing required parameter 'prompt'", "prompt")

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", "prompt")
    if any(isinstance(p, str) and not p for p in prompts):
        raise bad("'prompt' must not be empty", "prompt")
    model, n, stream, include_usage = _model_and_stream(data)
    lp = get_number(data, "logprobs", None, integer=True, lo=0, hi=20)
    echo = get_bool(data, "echo", False)
    # With echo the prompt comes back, with logprobs its tokens' logprobs too (lm-eval's
    # loglikelihood); max_tokens 0 then scores the prompt alone. Without logprobs the engine
    # still scores it (top 0) for max_tokens 0: one path for "read the prompt and stop".
    params, given = _common_params(data, 16, ("max_tokens",), prompt_logprobs=(lp or 0) if echo else None)
    if echo and lp is None and params.max_tokens > 0:
        params.prompt_logprobs = None
    params.logprobs = lp
    return OpenAIRequest("completion", model, prompts, params, given, n, stream, include_usage, echo, lp, data)


_ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's new name for system


def _message_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body: bytes) -> OpenAIRequest:
    data = parse_json_object(body)
    messages = data.get("messages")
    if messages is None:
        raise bad("missing required parameter 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {json.dumps(role)}", "messages")
        clean.append({"role": "system" if role == "developer" else role, "content": _message_text(m.get("content"), i)})
    model, n, stream, include_usage = _model_and_stream(data)
    # 1 is a placeholder: without a limit the route gives the rest of the context.
    params, given = _common_params(data, 1, ("max_completion_tokens", "max_tokens"))
    logprobs = get_bool(data, "logprobs", False)
    top = get_number(data, "top_logprobs", None, integer=True, lo=0, hi=20)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    lp = (top or 0) if logprobs else None
    params.logprobs = lp
    return OpenAIRequest("chat", model, [clean], params, given, n, stream, include_usage, False, lp, data)
