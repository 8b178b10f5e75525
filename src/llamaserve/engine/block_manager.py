"""The KV cache's blocks as plain Python: who holds which block, which blocks are free, and
which free blocks still hold a cached prefix (no torch; the runner maps ids to memory).

A block is `block_size` consecutive positions of one sequence. A block in use has a reference
count (sequences sharing a cached prefix share its blocks). A block whose count drops to zero
goes back to the free pool; if it holds a registered prefix (a hash) it stays findable, in
least-recently-freed order, until an allocation needs its memory (vLLM's and nano-vllm's
scheme).

Hashes chain: a block's hash covers its tokens and the hash of the block before it, and the
first one a salt that names everything else that changes the numbers (model, dtype, ...), so
equal hashes mean equal prefixes, not only equal blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """An allocation asked for more blocks than are free (callers check `can_allocate` first)."""


def block_hashes(token_ids: list[int], block_size: int, salt: bytes = b"", n_blocks: int | None = None) -> list[bytes]:
    """Chained hashes of the first `n_blocks` full blocks of `token_ids` (all full blocks by default)."""
    full = len(token_ids) // block_size
    n = full if n_blocks is None else min(n_blocks, full)
    out: list[bytes] = []
    prev = hashlib.blake2b(salt, digest_size=16).digest()
    for b in range(n):
        # 64-bit token ids: a vocabulary never overflows them, and the bytes are unambiguous.
        tokens = array("q", token_ids[b * block_size : (b + 1) * block_size]).tobytes()
        prev = hashlib.blake2b(prev + tokens, digest_size=16).digest()
        out.append(prev)
    return out


class BlockManager:
    """Block ids first_id .. first_id + num_blocks - 1, their reference counts and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, first_id: int = 0) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_id = first_id
        # Lowest id first, so a lightly loaded engine touches few pages of the pool.
        self._free = list(range(first_id + num_blocks - 1, first_id - 1, -1))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block -> its registered hash
        self._block_of: dict[bytes, int] = {}  # registered hash -> block
        # Free blocks that still hold a registered prefix, least recently freed first.
        self._cached_free: OrderedDict[int, None] = OrderedDict()

    # ---- counts --------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (plain free ones and cached ones it may evict)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose prefix a new request can find (in use or free)."""
        return len(self._block_of)

    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached free blocks count as free)."""
        return self.num_used / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block - self.first_id]

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with a reference count of 1; evicts least recently freed cached blocks
        once no plain free block is left. OutOfBlocks if fewer than n are free (nothing taken)."""
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks asked for, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._ref[block - self.first_id] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free, and stays
        findable by its hash (most recently freed last) if it has one. Later blocks of a
        sequence are evicted first: they are freed last but, being freed together, the order
        within one call puts the sequence's tail before its head."""
        for block in reversed(blocks):
            i = block - self.first_id
            if self._ref[i] <= 0:
                raise ValueError(f"block {block} is freed but nobody holds it")
            self._ref[i] -= 1
            if self._ref[i] == 0:
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    self._free.append(block)

    # ---- prefix cache --------------------------------------------------------------------------
    def register(self, block: int, block_hash: bytes) -> None:
        """Record that `block` (held) holds the prefix `block_hash`. A prefix already held by
        another block keeps that block (the newcomer stays private)."""
        if self._ref[block - self.first_id] <= 0:
            raise ValueError(f"block {block} is registered but nobody holds it")
        if block_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes` (takes no reference)."""
        out = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def take(self, blocks: list[int]) -> None:
        """One more reference to each (cached) block; a free one leaves the free pool."""
        for block in blocks:
            i = block - self.first_id
            if self._ref[i] == 0:
                if block not in self._cached_free:
                    raise ValueError(f"block {block} is neither held nor cached")
                del self._cached_free[block]
            self._ref[i] += 1

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (cached free blocks become plain free blocks)."""
        for block in self._cached_free:
            self._free.append(block)
        self._cached_free.clear()
        self._hash_of.clear()
        self._block_of.clear()
        self._free.sort(reverse=True)
