"""Which requests wait, which hold a slot and KV blocks, and what each engine step computes:
plain Python.

Policy of one step:
  * decoding requests get the block their next token needs; when none is free, the newest
    running request is preempted (its blocks freed, back to the front of the queue; it is
    computed again later, see below), until the block is there or the one asking was the newest;
  * unless that preempted someone, waiting requests take free slots in arrival order, each once
    blocks for all its tokens and the next one are free (the head of the queue waits for blocks
    rather than be overtaken); its prompt's blocks are taken then, reusing the longest cached
    prefix (see `reusable_prefix`);
  * prefill: prompts are cut into chunks of `prefill_chunk` from where the cached prefix ends
    (so a prompt is always cut the same way, whatever else is running: that keeps it
    bit-reproducible); a step
    runs the next chunks of the oldest prefilling request, then of the next ones, while they fit
    in a budget of `max_prefill_tokens` (default: one chunk), so a long prompt never stalls
    decoding users for more than that; the budget decides only which chunks share a step, never
    how a prompt is cut;
  * decode: every request whose prompt is fully prefilled decodes one token.
A request that finishes or is aborted gives its slot and blocks back at once.

Preempted requests keep their tokens. On their return the prompt is prefilled again (cut as
before) and the tokens already generated are fed again as decode rows without sampling
(`Sequence.replaying`), so every position is computed exactly as the first time: the request's
remaining tokens are the ones it would have produced without the preemption.

Prefix cache: the full blocks of a prompt, once prefilled, are registered under chained hashes
(engine/block_manager.py). Where the model computes a prompt row alike however the prompt is
cut (CPU kernels with row-independent matmuls: `prefill_is_chunk_invariant`), a new request
reuses every cached full block of its prompt but the one holding its last token. Elsewhere a
prompt row's bits may depend on its chunk, so reuse stops at a multiple of `prefill_chunk`: the
remaining prompt is then cut into the same chunks as without the cache, and the reused blocks
were computed by the same chunks of the same tokens, so every number is the one a full prefill
computes; and only blocks inside whole chunks are registered (a short last chunk computes its
rows in a different-sized call). The lookup is made at admission and again before each chunk,
so requests that arrive together with one system prompt compute it once: prefill goes in
arrival order, and the later ones find it cached.
"""

from __future__ import annotations

import enum
import math
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.block_manager import BlockManager, block_hashes
from llamaserve.engine.request import FinishReason, InvalidRequest, QueueFull, SamplingParams

BLOCK_SIZE = 16  # positions per KV block (model/kv_cache.py: BLOCK_SIZE)


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
    num_fed: int = 0  # generated tokens already in the cache (fed back as decode input)
    block_ids: list[int] = field(default_factory=list)  # KV blocks, in position order
    num_registered: int = 0  # leading blocks registered in the prefix cache
    num_preemptions: int = 0
    decode_position: int = 0  # position of the token this step's decode feeds
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    # Filled in by the engine: sampler state (generator, penalties), stop/detokenizer state.
    sampling_state: Any = None
    stop_state: Any = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's logprobs were asked for and not yet computed: every prompt position's
        logits are needed (a sequence resumed after preemption was scored the first time)."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def replaying(self) -> bool:
        """This step's decode feeds again a token generated before a preemption: its logits are
        not sampled (the token after it is known)."""
        return self.decode_position < self.num_tokens - 1

    def token_at(self, position: int) -> int:
        if position < self.prompt_len:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - self.prompt_len]


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
    decodes: list[Sequence]  # sampling rows first, then replaying ones, each in slot order
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue this step

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, max_users: int = 32, max_seq_len: int = 4096, prefill_chunk: int = 512, max_queued: int = 256,
                 num_blocks: int | None = None, block_size: int = BLOCK_SIZE, prefix_cache: bool = True,
                 cache_salt: bytes = b"", max_prefill_tokens: int | None = None):
        """num_blocks: the KV pool (None: max_seq_len positions for every user); cache_salt:
        what else than the tokens decides the cached numbers (model, dtype, ...);
        max_prefill_tokens: prompt tokens one step may prefill, in whole chunks (None: one chunk)."""
        if max_prefill_tokens is None:
            max_prefill_tokens = prefill_chunk
        for name, value in (
            ("max_users", max_users),
            ("max_seq_len", max_seq_len),
            ("prefill_chunk", prefill_chunk),
            ("max_prefill_tokens", max_prefill_tokens),
            ("max_queued", max_queued),
            ("block_size", block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_prefill_tokens < prefill_chunk:
            raise ValueError(f"max_prefill_tokens ({max_prefill_tokens}) must be at least prefill_chunk ({prefill_chunk})")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 (one prompt token and one output token), got {max_seq_len}")
        if num_blocks is None:
            num_blocks = max_users * -(-max_seq_len // block_size)
        self.blocks = BlockManager(num_blocks, block_size, first_id=1)  # block 0: the cache's null block
        self.block_size = block_size
        self.pool_tokens = num_blocks * block_size
        # One sequence must always fit alone, or preempting everyone else could not save it.
        self.max_seq_len = min(max_seq_len, self.pool_tokens)
        self.max_users = max_users
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queued = max_queued
        self.prefix_cache = prefix_cache
        self.cache_salt = cache_salt
        # Reuse and registration go by whole chunks, which are whole blocks (see the module's
        # docstring), until `prefill_is_chunk_invariant` says any block boundary will do.
        self.reuse_unit = math.lcm(prefill_chunk, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence by id
        # Lowest free slot first, so a lightly loaded engine touches few cache rows.
        self._free_slots = list(range(max_users - 1, -1, -1))
        self.counters = dict(prefix_cache_queries=0, prefix_cache_hits=0, preemptions=0)

    # ---- requests in and out ----------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty: at least one prompt token is needed", "prompt")
        if n + 1 > self.max_seq_len:
            pool = f"; the KV cache holds {self.pool_tokens} tokens" if self.pool_tokens == self.max_seq_len else ""
            raise InvalidRequest(
                f"the prompt has {n} tokens but the context limit is {self.max_seq_len} tokens "
                f"(prompt + at least one generated token must fit{pool})",
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
        """Mark a sequence finished and give its slot and blocks back immediately."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            self._release(seq)
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

    def _release(self, seq: Sequence) -> None:
        del self.running[seq.slot]
        self._free_slots.append(seq.slot)
        self._free_slots.sort(reverse=True)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []  # a new list: the runner re-copies a slot's table for a new list
        seq.num_registered = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.slot = None
        seq.status = SequenceStatus.WAITING
        seq.num_prefilled = seq.num_fed = 0
        seq.num_preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(seq)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._register_prefilled()
        preempted = self._grow_decoders()
        if not preempted:  # memory just ran short: nobody new until someone finishes
            self._admit()

        prefills: list[PrefillChunk] = []
        decodes: list[Sequence] = []
        budget = self.max_prefill_tokens
        blocked = False
        for seq in sorted(self.running.values(), key=_by_arrival):
            if seq.prefill_done:
                decodes.append(seq)
                continue
            if blocked:
                continue
            self._reuse_newly_cached(seq)
            start = seq.num_prefilled
            while start < seq.prompt_len and not blocked:
                end = min(start + self.prefill_chunk, seq.prompt_len)
                if prefills and end - start > budget:
                    blocked = True  # first come, first served: no overtaking by shorter prompts
                    break
                prefills.append(PrefillChunk(seq, start, end))
                budget -= end - start
                blocked = budget <= 0
                start = end
        for seq in decodes:
            seq.decode_position = seq.prompt_len + seq.num_fed
            seq.num_fed += 1
        decodes.sort(key=_by_replay_then_slot)
        return SchedulerOutput(prefills, decodes, preempted)

    def _grow_decoders(self) -> list[Sequence]:
        """A block for every decoding sequence whose next position starts one, oldest first,
        preempting the newest running sequences when none is free."""
        preempted: list[Sequence] = []
        for seq in sorted(self.running.values(), key=_by_arrival):
            if seq.status is not SequenceStatus.RUNNING or not seq.prefill_done:
                continue
            position = seq.prompt_len + seq.num_fed
            if position // self.block_size < len(seq.block_ids):
                continue
            while not self.blocks.can_allocate(1):
                victim = max(self.running.values(), key=_by_arrival)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                seq.block_ids += self.blocks.allocate(1)
        return preempted

    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            reused = self._cached_prefix(seq)
            # Cached blocks nobody holds leave the free pool when taken.
            idle = sum(1 for b in reused if self.blocks.ref_count(b) == 0)
            fresh = self.blocks.blocks_for(seq.prompt_len) - len(reused)
            # Room for every token it holds (a preempted one replays them) and the next one, so
            # that it is not preempted again by its own first step.
            growth = self.blocks.blocks_for(seq.num_tokens + 1) - self.blocks.blocks_for(seq.prompt_len)
            if not self.blocks.can_allocate(fresh + idle + growth):
                break  # the head of the queue waits for blocks; nobody overtakes it
            self.waiting.popleft()
            self.blocks.take(reused)
            seq.block_ids = reused + self.blocks.allocate(fresh)
            seq.num_registered = len(reused)
            seq.num_prefilled = len(reused) * self.block_size
            seq.num_fed = 0
            if not seq.num_preemptions:
                self.counters["prefix_cache_queries"] += seq.prompt_len
                self.counters["prefix_cache_hits"] += seq.num_prefilled
            seq.slot = self._free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running[seq.slot] = seq

    def prefill_is_chunk_invariant(self) -> None:
        """The model computes a prompt row alike wherever the prompt is cut into chunks
        (Transformer.prefill_chunk_invariant): reuse and register cached prefixes by the block."""
        self.reuse_unit = self.block_size

    def reusable_prefix(self, prompt_len: int) -> int:
        """Most prompt tokens a request may take from the cache: whole reuse units (chunks, or
        blocks), never the last token."""
        return (prompt_len - 1) // self.reuse_unit * self.reuse_unit

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.prefix_cache or seq.scores_prompt:
            return []  # prompt logprobs need the logits of every prompt position
        n_blocks = self.reusable_prefix(seq.prompt_len) // self.block_size
        if n_blocks == 0:
            return []
        found = self.blocks.lookup(block_hashes(seq.prompt_token_ids, self.block_size, self.cache_salt, n_blocks))
        return found[: len(found) * self.block_size // self.reuse_unit * self.reuse_unit // self.block_size]

    def _reuse_newly_cached(self, seq: Sequence) -> None:
        """Before a sequence's next chunk: take the chunks that others prefilled meanwhile (users
        arriving together with one system prompt: the first computes it, the rest wait behind it
        in arrival order and then take it), in place of its own still unwritten blocks."""
        if not self.prefix_cache or seq.params.prompt_logprobs is not None or seq.output_token_ids:
            return
        start = seq.num_prefilled // self.block_size
        limit = self.reusable_prefix(seq.prompt_len) // self.block_size
        if start >= limit:
            return
        hashes = block_hashes(seq.prompt_token_ids, self.block_size, self.cache_salt, limit)
        found = self.blocks.lookup(hashes)[start:]
        unit = self.reuse_unit // self.block_size
        found = found[: len(found) // unit * unit]
        if not found:
            return
        own = seq.block_ids[start : start + len(found)]
        self.blocks.take(found)
        self.blocks.free(own)
        # A new list: the runner copies a slot's whole table again for a list it has not seen.
        seq.block_ids = seq.block_ids[:start] + found + seq.block_ids[start + len(found) :]
        seq.num_prefilled += len(found) * self.block_size
        seq.num_registered = start + len(found)
        self.counters["prefix_cache_hits"] += len(found) * self.block_size

    def _register_prefilled(self) -> None:
        """Register the blocks of whole prefilled chunks in the prefix cache."""
        if not self.prefix_cache:
            return
        for seq in self.running.values():
            whole_chunks = min(seq.num_prefilled, seq.prompt_len // self.reuse_unit * self.reuse_unit)
            n = whole_chunks // self.block_size
            if n <= seq.num_registered:
                continue
            hashes = block_hashes(seq.prompt_token_ids, self.block_size, self.cache_salt, n)
            for block, h in zip(seq.block_ids[seq.num_registered : n], hashes[seq.num_registered :]):
                self.blocks.register(block, h)
            seq.num_registered = n

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
        """Fraction of the pool's blocks held by running sequences."""
        return self.blocks.usage()


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


def _by_replay_then_slot(seq: Sequence) -> tuple[bool, int]:
    return seq.replaying, seq.slot if seq.slot is not None else -1
