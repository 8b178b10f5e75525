"""When a request stops, and which text it may send: plain Python, one object per request.

Stop conditions, checked after every generated token, in this order:
  1. a stop token: the tokenizer's (end of text / end of turn) unless `ignore_eos`, and the
     request's own `stop_token_ids`; the token is counted but its text is never sent;
  2. a stop string, matched on the decoded text (so also across token boundaries); the text
     from the stop string on is never sent;
  3. exactly `max_tokens` generated tokens, or prompt + output reaching the context limit.
Text that could still turn out to be the beginning of a stop string is held back until the
next tokens decide; it is released when the request ends another way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from llamaserve.engine.request import FinishReason, SamplingParams


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...


class StopChecker:
    def __init__(
        self,
        detokenizer: Detokenizer,
        params: SamplingParams,
        tokenizer_stop_ids: Iterable[int],
        prompt_len: int,
        max_seq_len: int,
    ) -> None:
        self.detokenizer = detokenizer
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(tokenizer_stop_ids)
        self.stop_ids = frozenset(ids)
        self.stop_strings = tuple(params.stop)
        self.max_tokens = params.max_tokens
        # The generated token count at which the context is full.
        self.context_limit = max_seq_len - prompt_len
        self.text = ""  # everything decoded so far, stop strings included
        self.sent = 0  # characters of `text` already handed out
        self.generated = 0

    def append(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Take one generated token; returns (text to send now, finish reason or None)."""
        self.generated += 1
        if token_id in self.stop_ids:
            return self._release_all(final=True), FinishReason.STOP
        delta = self.detokenizer.push(token_id)
        if delta:
            self.text += delta
        if self.stop_strings and delta:
            hit = self._find_stop()
            if hit is not None:
                out = self.text[self.sent : hit]
                self.text = self.text[:hit]
                self.sent = hit
                return out, FinishReason.STOP
        if self.generated >= self.max_tokens or self.generated >= self.context_limit:
            return self._release_all(final=True), FinishReason.LENGTH
        if not self.stop_strings:
            return self._release_all(), None
        keep = self._held_back()
        end = len(self.text) - keep
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out, None

    def _release_all(self, final: bool = False) -> str:
        if final:
            # An unfinished character at the very end becomes U+FFFD, as a full decode gives.
            flush = getattr(self.detokenizer, "flush", None)
            tail = flush() if flush is not None else ""
            if tail:
                self.text += tail
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _find_stop(self) -> int | None:
        # Held-back text already excludes any earlier start, so a match begins at or after `sent`.
        best = None
        for stop in self.stop_strings:
            i = self.text.find(stop, self.sent)
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _held_back(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        unsent = self.text[self.sent :]
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(unsent)), longest, -1):
                if unsent.endswith(stop[:n]):
                    longest = n
                    break
        return longest
