"""Where the OpenAI routes refuse what OpenAI (and vLLM) refuse, instead of quietly doing less.

Policy:
- A parameter we do not implement gets a 400 naming it (`tools`, `tool_choice`, `functions`,
  `function_call`, `logit_bias`, `response_format` other than text, `suffix`), never a silent
  ignore: a client that relies on it must learn that it had no effect. Empty values (null, [],
  {}, `tool_choice: "none"`, `response_format: {"type": "text"}`) ask for nothing and pass;
  `user` is accepted (it only labels the request).
- A prompt plus an explicit `max_tokens` (or `max_completion_tokens`) beyond the context is a 400
  with OpenAI's code `context_length_exceeded` and vLLM's message, unless the request opts into
  capping with `"cap_max_tokens": true` (a llamaserve extension): then generation stops at the
  context's end with finish_reason "length". Without an explicit limit, chat completions get the
  rest of the context and completions OpenAI's default of 16 (capped).
"""

from __future__ import annotations

from typing import Any

from llamaserve.server.protocol import ApiError, get_bool

# Parameter -> what the request asked for that we cannot do.
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "parallel_tool_calls": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "logit_bias": "logit biases",
    "response_format": "structured output",
    "suffix": "completion suffixes",
}
CAP_FIELD = "cap_max_tokens"


def _asks_for_nothing(name: str, value: Any) -> bool:
    if value is None or value == [] or value == {}:
        return True
    if name == "tool_choice":
        return value == "none"
    if name == "parallel_tool_calls":
        return isinstance(value, bool)  # only meaningful with tools, which are refused
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if name == "suffix":
        return value == ""
    return False


def reject_unsupported(data: dict[str, Any]) -> None:
    """400 naming the first parameter of `data` that asks for something not implemented."""
    for name, what in UNSUPPORTED.items():
        if name in data and not _asks_for_nothing(name, data[name]):
            detail = ""
            if name == "response_format" and isinstance(data[name], dict):
                detail = f" of type {data[name].get('type')!r} (only {{'type': 'text'}} is)"
            raise ApiError(400, f"Unsupported parameter: '{name}'{detail} is not supported by this server "
                                f"({what} is not implemented). Remove it from the request.",
                           param=name, code="unsupported_parameter")


def wants_cap(data: dict[str, Any]) -> bool:
    return get_bool(data, CAP_FIELD, False)


def fit_max_tokens(prompt_tokens: int, max_tokens: int, limit: int, given: bool, cap: bool, chat: bool) -> int:
    """The max_tokens to run with, or the 400 OpenAI and vLLM answer when prompt + max_tokens
    exceeds the context and the request neither left max_tokens to us nor asked for capping."""
    if prompt_tokens + max_tokens <= limit:
        return max_tokens
    if not given or cap:
        return limit - prompt_tokens
    where = "messages" if chat else "prompt"
    raise ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the completion). "
        f"Please reduce the length of the {where} or completion, or send \"{CAP_FIELD}\": true to stop at "
        f"the context's end instead.",
        param="max_tokens", code="context_length_exceeded",
    )
