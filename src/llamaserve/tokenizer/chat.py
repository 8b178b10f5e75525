"""Chat formats: turn a list of {role, content} messages into prompt token ids.

Llama 3 (Meta's ChatFormat, header/eot tokens):
    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                    (generation prompt)

Llama 2 (Meta's `chat_completion`): the system prompt is folded into the first user turn as
"<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}", every finished exchange is
"<s>[INST] {user} [/INST] {answer} </s>" and the open one "<s>[INST] {user} [/INST]".

Content is stripped of surrounding whitespace in both, as Meta's reference and the Hugging Face
templates do. Text inside messages is always encoded as plain text, so a user cannot forge a
header or end-of-turn token. Llama 2's markers are plain text, so messages that contain them are
refused, as Meta's reference does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaserve.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant")
LLAMA2_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
_B_SYS, _E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    # OpenAI-style content parts: [{"type": "text", "text": "..."}, ...]
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"messages[{index}].content: only text parts are supported, got {part!r:.80}")
        return "".join(parts)
    raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")


def normalize_messages(messages: Sequence, add_generation_prompt: bool, strict_order: bool = True,
                       strip: bool = True) -> list[tuple[str, str]]:
    """Check roles (and with `strict_order` the order); return (role, stripped content) pairs.

    Strict order (what Llama 2's format can express): an optional first "system" message, then
    turns alternating user, assistant, user, ...; a dialog that asks for a generation prompt must
    end with a user turn. Llama 3's headers can express any sequence of roles (two user messages
    in a row, a later system message), as OpenAI clients send them, so it does not ask for this.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, Mapping):
            role, content = msg.get("role"), msg.get("content")
        else:
            role, content = getattr(msg, "role", None), getattr(msg, "content", None)
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if content is None:
            raise ValueError(f"messages[{i}] has no content")
        text = _content_text(content, i)
        out.append((role, text.strip() if strip else text))
    if not strict_order:
        return out

    turns = out[1:] if out[0][0] == "system" else out
    for j, (role, _) in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            i = j + (len(out) - len(turns))
            if role == "system":
                raise ValueError(f"messages[{i}]: a system message is only allowed first")
            raise ValueError(
                f"messages[{i}].role is {role!r} but {expected!r} was expected: after an optional system "
                f"message, turns must alternate user, assistant, user, ..."
            )
    if not turns:
        raise ValueError("messages hold only a system message; at least one user message is needed")
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError("the last message must be from the user when asking for the assistant's reply")
    return out


def encode_llama3_chat(tok: "Tokenizer", messages: Sequence, add_generation_prompt: bool = True) -> list[int]:
    msgs = normalize_messages(messages, add_generation_prompt, strict_order=False)
    ids_of = tok.special_tokens
    try:
        start, end, eot = ids_of["<|start_header_id|>"], ids_of["<|end_header_id|>"], ids_of["<|eot_id|>"]
    except KeyError as e:
        raise ValueError(f"tokenizer {tok.path} has no Llama 3 chat token {e}") from None
    blank = tok.encode("\n\n")

    def header(role: str) -> list[int]:
        return [start, *tok.encode(role), end, *blank]

    ids = [tok.bos_id]
    for role, content in msgs:
        ids += header(role)
        ids += tok.encode(content)
        ids.append(eot)
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def encode_llama2_chat(tok: "Tokenizer", messages: Sequence, add_generation_prompt: bool = True) -> list[int]:
    msgs = normalize_messages(messages, add_generation_prompt)
    for i, (_, content) in enumerate(msgs):
        for marker in LLAMA2_MARKERS:
            if marker in content:
                raise ValueError(
                    f"messages[{i}] contains {marker!r}, which is part of the Llama 2 chat format and is "
                    f"not allowed inside a message"
                )
    if msgs[0][0] == "system":
        system, first_user = msgs[0][1], msgs[1][1]
        msgs = [("user", f"{_B_SYS}{system}{_E_SYS}{first_user}".strip()), *msgs[2:]]
    ids: list[int] = []
    for k in range(0, len(msgs), 2):
        user = msgs[k][1]
        if k + 1 < len(msgs):
            answer = msgs[k + 1][1]
            ids += tok.encode(f"[INST] {user} [/INST] {answer} ", bos=True, eos=True)
        else:
            ids += tok.encode(f"[INST] {user} [/INST]", bos=True)
    return ids


def encode_chat(tok: "Tokenizer", messages: Sequence, add_generation_prompt: bool = True) -> list[int]:
    if tok.template is not None:
        from llamaserve.tokenizer.template import encode_with_template

        return encode_with_template(tok, tok.template, messages, add_generation_prompt)
    if tok.chat_template == "llama3":
        return encode_llama3_chat(tok, messages, add_generation_prompt)
    return encode_llama2_chat(tok, messages, add_generation_prompt)
