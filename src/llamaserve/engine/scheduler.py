"""Which requests wait, which hold a slot, and what each engine step computes: plain Python.

Policy of one step:
  * waiting requests take free slots in arrival order;
  * prefill: prompts are cut into chunks at fixed multiples of `prefill_chunk` (so a prompt is
    always cut the same way, whatever else is running: that keeps it bit-reproducible); a step
    runs the next chunk of the oldest prefilling request, plus further chunks while they fit in
    a budget of `prefill_chunk` tokens, so a long prompt never stalls decoding users for more
    than one chunk;
  * decode: every request whose prompt is fully prefilled decodes one token.
A request that finishes or is aborted gives its slot back at once.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # holds a slot: prefilling or decoding
    FINISHED = "finished"


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request through its whole life in the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    num_prefilled: int = 0  # prompt tokens already in the cache
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    # Filled in by the engine: sampler state (generator, penalties), stop/detokenizer state.
    sampling_state: Any = None
    stop_state: Any = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past the last

    @property
    def is_last(self) -> bool:
        return self.end == self.seq.prompt_len


@dataclass
class SchedulerOutput:
    prefills: list[PrefillChunk]
    decodes: list[Sequence]  # in slot order

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, max_users: int = 32, max_seq_len: int = 4096, prefill_chunk: int = 512, max_queued: int = 256):
        for name, value in (
            ("max_users", max_users),
            ("max_seq_len", max_seq_len),
            ("prefill_chunk", prefill_chunk),
            ("max_queued", max_queued),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 (one prompt token and one output token), got {max_seq_len}")
        self.max_users = max_users
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.max_queued = max_queued
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence by id
        # Lowest free slot first, so a lightly loaded engine touches few cache rows.
        self._free_slots = list(range(max_users - 1, -1, -1))

    # ---- requests in and out ----------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty: at least one prompt token is needed", "prompt")
        if n + 1 > self.max_seq_len:
            raise InvalidRequest(
                f"the prompt has {n} tokens but the context limit is {self.max_seq_len} tokens "
                f"(prompt + at least one generated token must fit)",
                "prompt",
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; InvalidRequest if its prompt can never fit, QueueFull when full."""
        if seq.request_id in self.requests:
            raise InvalidRequest(f"request id {seq.request_id!r} is already in use", "request_id")
        self.check_prompt(seq.prompt_token_ids)
        # Requests that the next step will seat in a free slot are not really waiting.
        if len(self.waiting) - len(self._free_slots) >= self.max_queued:
            raise QueueFull(f"the waiting queue is full ({self.max_queued} requests wait for a slot)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark a sequence finished and give its slot back immediately."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            del self.running[seq.slot]
            self._free_slots.append(seq.slot)
            self._free_slots.sort(reverse=True)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.requests.pop(seq.request_id, None)

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running request; returns it, or None if unknown or finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            seq.num_prefilled = 0
            self.running[seq.slot] = seq

        prefills: list[PrefillChunk] = []
        decodes: list[Sequence] = []
        budget = self.prefill_chunk
        blocked = False
        for seq in sorted(self.running.values(), key=_by_arrival):
            if seq.prefill_done:
                decodes.append(seq)
                continue
            if blocked:
                continue
            start = seq.num_prefilled
            end = min(start + self.prefill_chunk, seq.prompt_len)
            if prefills and end - start > budget:
                blocked = True  # first come, first served: no overtaking by shorter prompts
                continue
            prefills.append(PrefillChunk(seq, start, end))
            budget -= end - start
            blocked = budget <= 0
        decodes.sort(key=_by_slot)
        return SchedulerOutput(prefills, decodes)

    # ---- state ------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def cache_usage(self) -> float:
        """Fraction of all slot positions holding a token."""
        used = sum(min(s.num_prefilled + len(s.output_token_ids), self.max_seq_len) for s in self.running.values())
        return used / (self.max_users * self.max_seq_len)


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


def _by_slot(seq: Sequence) -> int:
    return seq.slot if seq.slot is not None else -1
