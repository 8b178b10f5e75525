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
        self._matcher = StopMatcher(self.stop_strings)
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
        return self._matcher.feed(self.text, self.sent)

    def _held_back(self) -> int:
        """Length of the longest unsent suffix that is a proper prefix of a stop string."""
        return min(self._matcher.depth, len(self.text) - self.sent)


class StopMatcher:
    """Aho-Corasick over the stop strings: each character of generated text costs amortised
    O(1), whatever the number of stop strings (scanning each of them per token made one
    request with thousands of stops slow down every other user of the engine)."""

    def __init__(self, stops: Iterable[str]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        final = [0]  # length of the stop string that ends at this node, 0 if none
        for stop in stops:
            node = 0
            for ch in stop:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    final.append(0)
                node = nxt
            final[node] = len(stop)
        fail = [0] * len(goto)
        # longest[n]: the longest stop string that is a suffix of node n's text (the earliest
        # start among the matches ending here), through the failure links.
        longest = list(final)
        order = list(goto[0].values())
        for node in order:  # breadth first: a node's failure target is shallower, so done
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                target = goto[f].get(ch, 0) if node else 0
                fail[child] = target if target != child else 0
                longest[child] = final[child] or longest[fail[child]]
                order.append(child)
        self._goto, self._fail, self._depth, self._longest = goto, fail, depth, longest
        self._node = 0
        self._fed = 0  # characters of the text consumed so far

    @property
    def depth(self) -> int:
        """Length of the longest suffix of the text fed so far that is a prefix of a stop string."""
        return self._depth[self._node]

    def feed(self, text: str, start: int) -> int | None:
        """Consumes text[self._fed:]; returns the earliest start, at or after `start`, of a stop
        string ending in it, or None."""
        goto, fail, longest = self._goto, self._fail, self._longest
        node, best = self._node, None
        for end in range(self._fed, len(text)):
            ch = text[end]
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            if longest[node]:
                begin = end + 1 - longest[node]
                if begin >= start and (best is None or begin < best):
                    best = begin
        self._node, self._fed = node, len(text)
        return best
