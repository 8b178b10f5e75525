"""A checkpoint's own chat template: Jinja rendered as `transformers.apply_chat_template` does,
in a sandbox, then encoded so that message text can never become a special token.

Where a template comes from (first found): `--chat-template FILE`, `chat_template.jinja` next to
the tokenizer, `chat_template` in `tokenizer_config.json` (a string, or a list of named templates
of which "default" is used).

Rendering: jinja2's ImmutableSandboxedEnvironment with transformers' settings (trim_blocks,
lstrip_blocks, loopcontrols, `tojson` without HTML escaping, `raise_exception`, `strftime_now`)
and variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, ...). A template is
downloaded code: the sandbox refuses Python internals (`__class__`, `__globals__`, ...), a
template has no loader (so `include`/`import` cannot read files), and a template that tries is
refused when it is loaded (a trial render) with an error naming where it came from.

Encoding: transformers tokenizes the rendered string as a whole, so a user who types
"<|im_end|>" closes their own turn. Here every special-token spelling inside message text is
wrapped in two Unicode noncharacters before rendering; after rendering, the wrapped spans are
encoded as plain text and the rest with special tokens recognised. Text without special-token
spellings renders and encodes exactly as transformers does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamaserve.tokenizer.base import Tokenizer

MAX_TEMPLATE_BYTES = 1 << 20
# Noncharacters: "permanently reserved for internal use", never meaningful in interchanged text.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_SPAN = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.DOTALL)
_TRIAL = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


class ChatTemplateError(ValueError):
    """A chat template cannot be read, compiled, or is refused by the sandbox."""


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class NoFiles(jinja2.BaseLoader):
        def get_source(self, environment, template):
            raise jinja2.exceptions.SecurityError(f"a chat template may not read files (asked for {template!r:.80})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # jinja2 hands back a silent Undefined that only fails when used further; a template
            # that reaches for internals at all is refused on the spot.
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, loader=NoFiles(), extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, origin: str, variables: Mapping[str, str]) -> None:
        import jinja2

        self.source = source
        self.origin = origin
        self.variables = dict(variables)  # bos_token, eos_token, ... as strings
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: not a valid chat template: {e.message} (line {e.lineno})") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{origin}: not a valid chat template: {e}") from None
        try:
            self.render(_TRIAL, True)
        except ChatTemplateError:
            raise
        except ValueError:
            pass  # the template's own rules (raise_exception) may refuse the trial dialog

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.variables)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template was refused by the sandbox: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) and undefined names
            raise ValueError(f"chat template: {e.message or e}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError, OverflowError) as e:
            raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def read_template_file(path: str | Path) -> str:
    from llamaserve.config import ConfigError, read_regular_file

    try:
        data = read_regular_file(Path(path).expanduser(), MAX_TEMPLATE_BYTES, what="chat template")
        return data.decode("utf-8")
    except ConfigError as e:
        raise ChatTemplateError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"{path}: a chat template must be UTF-8 text (byte {e.start})") from None


def find_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(template source, where it came from) of a tokenizer folder, or None."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists() or jinja_file.is_symlink():
        return read_template_file(jinja_file), str(jinja_file)
    value = tokenizer_config.get("chat_template")
    origin = f"{folder / 'tokenizer_config.json'} chat_template"
    if value is None:
        return None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" not in named:
            raise ChatTemplateError(f"{origin}: a list of templates without one named 'default' ({sorted(map(str, named))})")
        value, origin = named["default"], origin + "[default]"
    if not isinstance(value, str):
        raise ChatTemplateError(f"{origin} must be a string, got {type(value).__name__}")
    return value, origin


def _mark_specials(text: str, pattern: re.Pattern | None, index: int) -> str:
    if _OPEN in text or _CLOSE in text:
        raise ValueError(f"messages[{index}] contains U+FDD0/U+FDD1, Unicode noncharacters that are not allowed in text")
    if pattern is None:
        return text
    return pattern.sub(lambda m: _OPEN + m.group(0) + _CLOSE, text)


def _template_messages(messages: Sequence, pattern: re.Pattern | None) -> list[dict]:
    from llamaserve.tokenizer.chat import normalize_messages

    pairs = normalize_messages(messages, add_generation_prompt=False, strict_order=False, strip=False)
    return [{"role": role, "content": _mark_specials(content, pattern, i)} for i, (role, content) in enumerate(pairs)]


def encode_with_template(tok: "Tokenizer", template: ChatTemplate, messages: Sequence,
                         add_generation_prompt: bool = True) -> list[int]:
    rendered = template.render(_template_messages(messages, tok.special_pattern()), add_generation_prompt)
    ids: list[int] = []
    pos = 0
    for m in _SPAN.finditer(rendered):
        ids += tok.encode_with_specials(rendered[pos:m.start()])
        ids += tok.encode(m.group(1))  # text a user typed: plain, whatever it spells
        pos = m.end()
    rest = rendered[pos:]
    if _OPEN in rest or _CLOSE in rest:
        # The template cut message text inside a special-token spelling; refuse rather than guess.
        raise ValueError("the chat template cut a message inside a special-token spelling; remove it from the message")
    return ids + tok.encode_with_specials(rest)


def render_with_template(template: ChatTemplate, messages: Sequence, add_generation_prompt: bool = True) -> str:
    """The rendered prompt string (what transformers' apply_chat_template(tokenize=False) gives)."""
    return template.render(_template_messages(messages, None), add_generation_prompt)
