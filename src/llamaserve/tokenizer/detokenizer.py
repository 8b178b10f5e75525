"""Streaming token -> text conversion for one generation.

A token can end in the middle of a UTF-8 character (Llama 3 spells an emoji in up to 4 byte
tokens; Llama 2 falls back to <0xNN> byte pieces), so bytes are fed to an incremental UTF-8
decoder that holds back an unfinished character until its last byte arrives. Each push costs
O(bytes of the new token); nothing already decoded is looked at again. Because the decoder uses
the same "replace" rule as `Tokenizer.decode`, the deltas joined (after `flush`) are exactly
`tokenizer.decode(all pushed ids)`.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from llamaserve.tokenizer.base import Tokenizer

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = _Utf8Decoder(errors="replace")
        # Until the first token that decodes to something, that token may lose a leading space.
        self._at_start = tokenizer.strips_leading_space
        self._parts: list[str] = []
        self._text: str | None = ""
        self.num_tokens = 0

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is open)."""
        data = self._tok.token_bytes(token_id)
        if self._at_start and data:
            data = self._tok.first_token_bytes(token_id)
            self._at_start = False
        self.num_tokens += 1
        return self._emit(self._utf8.decode(data))

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join([self.push(t) for t in token_ids])

    def flush(self) -> str:
        """End of generation: an unfinished character at the end becomes U+FFFD, as in decode()."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
            self._text = None
        return delta

    @property
    def text(self) -> str:
        """All complete text so far (the joined deltas)."""
        if self._text is None:
            self._text = "".join(self._parts)
            self._parts = [self._text]
        return self._text

    @property
    def pending_bytes(self) -> int:
        """Bytes held back because they do not yet form a whole character."""
        return len(self._utf8.getstate()[0])
