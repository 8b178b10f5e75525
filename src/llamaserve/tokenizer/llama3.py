"""Llama 3 tokenizer: tiktoken BPE over Meta's `tokenizer.model` plus 256 special tokens.

The file is one line per token, "<base64 bytes> <rank>". The special tokens are not in it: Meta
numbers them right after the last rank (128000..128255 for the real file), in the order below.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from types import MappingProxyType

import tiktoken

from llamaserve.tokenizer.base import Tokenizer, TokenizerError

# The pre-tokenisation regex Llama 3 was trained with; changing one character changes the ids.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)


def special_token_names() -> list[str]:
    """The 256 special token names in id order (the reserved ones continue from index 2)."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return list(_NAMED_SPECIAL_TOKENS) + reserved


# tiktoken's regex engine can overflow its stack on very long runs of whitespace or of
# non-whitespace (tiktoken issue 195) and panics on very long inputs, so long text is cut into
# pieces first. The cuts only fall inside runs far longer than any token, so ids are unchanged.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")

_LINE = re.compile(rb"^([A-Za-z0-9+/]+={0,2})[ \t]+([0-9]+)$")


def looks_like_tiktoken(head: bytes) -> bool:
    """True when the first line of a file has the tiktoken "<base64> <rank>" shape."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return _LINE.match(first) is not None


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file strictly: a bad line is an error, not a skipped line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            m = _LINE.match(line)
            try:
                if m is None:
                    raise ValueError("expected '<base64 token> <rank>'")
                token = base64.b64decode(m.group(1), validate=True)
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(
                    f"tokenizer file {path} is corrupt at line {lineno}: {line[:60]!r} ({e})"
                ) from None
            rank = int(m.group(2))
            if token in ranks:
                raise TokenizerError(f"tokenizer file {path} is corrupt at line {lineno}: token listed twice")
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"tokenizer file {path} holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"tokenizer file {path} is corrupt: ranks are not 0..{len(ranks) - 1} without gaps "
            f"(truncated or edited file?)"
        )
    return ranks


def _split_long_runs(text: str):
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start:start + _MAX_ENCODE_CHARS]
        cut = 0
        for m in _RUN.finditer(chunk):
            if m.end() - m.start() > _MAX_RUN_CHARS:
                for pos in range(m.start() + _MAX_RUN_CHARS, m.end(), _MAX_RUN_CHARS):
                    yield chunk[cut:pos]
                    cut = pos
        yield chunk[cut:]


class Llama3Tokenizer(Tokenizer):
    family = "llama3"
    chat_template = "llama3"

    def __init__(self, path: Path):
        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        n_base = len(ranks)
        special = {name: n_base + i for i, name in enumerate(special_token_names())}
        self.special_tokens = MappingProxyType(special)
        try:
            self._enc = tiktoken.Encoding(
                name=self.path.name,
                pat_str=PATTERN,
                mergeable_ranks=ranks,
                special_tokens=special,
            )
        except Exception as e:  # tiktoken rejects e.g. a vocabulary without all 256 single bytes
            raise TokenizerError(f"tokenizer file {self.path} is not a usable tiktoken BPE: {e}") from e
        table = [b""] * (n_base + NUM_SPECIAL_TOKENS)
        for token, rank in ranks.items():
            table[rank] = token
        for name, token_id in self.special_tokens.items():
            table[token_id] = name.encode()
        self._token_bytes = table
        self.vocab_size = len(table)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_token_ids = frozenset({self.eos_id, self.special_tokens["<|eot_id|>"]})

    def _encode_text(self, text: str) -> list[int]:
        if len(text) <= _MAX_RUN_CHARS:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for piece in _split_long_runs(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids) -> bytes:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._enc.decode_bytes(ids)
