"""A fake model with the `Transformer` forward interface: cheap, deterministic, no weights.

It lets the server, the engine and the clients be developed and tested without a real model,
through exactly the same engine code path (the original project shipped a mock backend for the
same reason). Every 10th generated token of a request is end-of-turn, like the original mock.

Two gates, read from the environment of the process that builds the mock (the engine process),
let tests hold a server in a state for as long as they check it, where a sleep or a step delay
would race with a busy CPU: the mock finishes loading only once the file named by
LLAMASERVE_MOCK_LOAD_GATE exists, and does not start a step while the file named by
LLAMASERVE_MOCK_PAUSE exists.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from llamaserve.config import BUILTIN_MODEL_ARGS, ModelArgs
from llamaserve.model.kv_cache import BLOCK_SIZE, BlockTables, kv_bytes_per_token
from llamaserve.model.serving import ServingPlan

MOCK_NAME = "llamaserve-mock"
EOT_EVERY = 10
LLAMA3_EOT_ID = 128009
# Llama 3 tokenizer ids in this range are ordinary English sub-words, so the mock's text is
# readable and never contains special tokens.
_TEXT_IDS = (1000, 20000)
_HASH_MOD = (1 << 61) - 1
LOAD_GATE_ENV, PAUSE_ENV = "LLAMASERVE_MOCK_LOAD_GATE", "LLAMASERVE_MOCK_PAUSE"
GATE_POLL_S = 0.01


def _wait_for_gates(load: bool) -> None:
    """Block while a test holds the mock (see the module docstring)."""
    gate = os.environ.get(LOAD_GATE_ENV) if load else None
    while gate and not os.path.exists(gate):
        time.sleep(GATE_POLL_S)
    pause = os.environ.get(PAUSE_ENV)
    while pause and os.path.exists(pause):
        time.sleep(GATE_POLL_S)


class MockCache:
    """Stands in for `KVCache`: holds no tensors, only block tables, where each slot's prompt
    ended, and a hash per written position."""

    def __init__(self, n_slots: int, max_seq_len: int, num_blocks: int | None = None,
                 block_size: int = BLOCK_SIZE) -> None:
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.tables = BlockTables(n_slots, max_seq_len, block_size, "cpu", identity=num_blocks is None)
        self.num_blocks = n_slots * self.tables.max_blocks if num_blocks is None else num_blocks
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.prompt_end = [0] * (n_slots + 1)
        # (block, offset) -> hash of every token fed up to that position, so the next token
        # depends on the whole prefix (two prompts that end alike still get different
        # continuations). Kept by block like a KV cache: a position written again replaces the
        # old hash, and a block shared through the prefix cache gives its hashes to every reader.
        self.prefix_hash: dict[tuple[int, int], int] = {}

    def where(self, slot: int, pos: int) -> tuple[int, int]:
        return int(self.tables.host[slot, pos // self.block_size]), pos % self.block_size

    def nbytes(self) -> int:
        return 0


class MockTransformer(nn.Module):
    """forward(tokens [B,T], start_pos [B], slots [B], cache, all_logits) -> fp32 logits.

    The next token is a fixed function of the previous token and its position, so greedy
    decoding is reproducible; every `eot_every`-th generated token is `eot_id`. `step_delay`
    seconds are slept per call to imitate a slow device.
    """

    def __init__(
        self,
        args: ModelArgs = BUILTIN_MODEL_ARGS,
        step_delay: float = 0.0,
        eot_id: int = LLAMA3_EOT_ID,
        eot_every: int = EOT_EVERY,
    ) -> None:
        super().__init__()
        if eot_id >= args.vocab_size:
            raise ValueError(f"mock eot_id {eot_id} is outside the vocabulary ({args.vocab_size})")
        self.args = args
        self.step_delay = step_delay
        self.eot_id = eot_id
        self.eot_every = eot_every
        lo, hi = _TEXT_IDS
        self._lo, self._span = min(lo, args.vocab_size // 4), max(1, min(hi, args.vocab_size) - min(lo, args.vocab_size // 4))
        # A fixed low-amplitude background so that sampling with temperature has a real distribution.
        gen = torch.Generator().manual_seed(1234)
        self.register_buffer("background", torch.rand(args.vocab_size, generator=gen), persistent=False)
        _wait_for_gates(load=True)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.background.device

    def new_cache(self, n_slots: int, max_seq_len: int, num_blocks: int | None = None,
                  block_size: int = BLOCK_SIZE) -> MockCache:
        return MockCache(n_slots, max_seq_len, num_blocks, block_size)

    def prepare_for_serving(self) -> ServingPlan:
        return ServingPlan()  # nothing to pack; decode pads to the CPU's stable row count

    def kv_bytes_per_token(self) -> int:
        """What the real model of these arguments would take, so memory budgets size a pool."""
        return kv_bytes_per_token(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim, torch.float32)

    def _next_token(self, prefix_hash: int, pos: int, generated_index: int) -> int:
        if generated_index > 0 and generated_index % self.eot_every == 0:
            return self.eot_id
        return self._lo + (prefix_hash ^ (pos * 104729)) % self._span

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: torch.Tensor,
        slots: torch.Tensor,
        cache: MockCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        _wait_for_gates(load=False)
        if self.step_delay > 0:
            time.sleep(self.step_delay)
        bsz, seqlen = tokens.shape
        if int(start_pos.max()) + seqlen > cache.max_seq_len:
            raise ValueError(f"position {int(start_pos.max()) + seqlen - 1} is beyond the cache length {cache.max_seq_len}")
        # Only the rows asked for are materialised: a long prefill must not allocate [T, V].
        steps = list(range(seqlen)) if all_logits else [seqlen - 1]
        out = self.background.expand(bsz, len(steps), -1).clone()  # [B, T or 1, V]
        tok = tokens.tolist()
        for b in range(bsz):
            slot, start = int(slots[b]), int(start_pos[b])
            if seqlen > 1 or start == 0:
                # A prefill (or a chunk of one): generation starts after this call's last token.
                cache.prompt_end[slot] = start + seqlen
            h = cache.prefix_hash.get(cache.where(slot, start - 1), 0) if start > 0 else 0
            hashes = []
            for i, t in enumerate(tok[b]):
                h = (h * 1000003 + t + 1) % _HASH_MOD
                hashes.append(h)
                cache.prefix_hash[cache.where(slot, start + i)] = h
            for i, t in enumerate(steps):
                pos = start + t
                # The token sampled from position `pos` is generated token number pos - end + 2.
                generated = pos - cache.prompt_end[slot] + 2
                out[b, i, self._next_token(hashes[t], pos, generated)] = 20.0
        return out if all_logits else out[:, 0]
