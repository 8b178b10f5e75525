"""Paged KV cache: a pool of fixed-size blocks, one block table per sequence slot, and the
attention plan of one forward call.

Block 0 is the null block: it belongs to nobody, every unused table entry points at it, and
decode padding rows (the padding slot, the table row after the sequences' rows) write and read
only there. A cache built without a block count gives every slot its own max_seq_len positions
(slot s owns blocks 1 + s * max_blocks ..), the layout of a slot cache; the runner builds the
pool from a memory budget instead and fills the tables as the block manager hands out blocks.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

# Keys are read up to a whole bucket past the furthest position of the batch. Rows see only
# their own positions through the mask; on CPU, scaled_dot_product_attention gives a row the same
# bits whatever the masked tail length (in whole buckets of 16: the kernel's vector width shows
# through otherwise), batch size or strides (tests/test_batch_invariance.py checks it), so the
# bucket and the other rows never change a row's result. (Feeding the query heads that share a
# KV head as rows of one query block is 20% faster but loses this property: measured.)
KV_BUCKET = 16
# Positions per block: one key bucket, and one 16-key tile of the decode kernel (which needs a
# multiple of 16). Larger blocks only waste the unfilled tail of each sequence's last block.
BLOCK_SIZE = 16
NULL_BLOCK = 0


class BlockTables:
    """[n_slots + 1, max_blocks] int64 block ids per slot (the last row: the padding slot), kept
    on the host and copied to the device before a call when they changed."""

    def __init__(self, n_slots: int, max_seq_len: int, block_size: int, device: torch.device | str,
                 identity: bool) -> None:
        if block_size < 1 or block_size % KV_BUCKET:
            raise ValueError(f"block_size must be a positive multiple of {KV_BUCKET}, got {block_size}")
        self.n_slots = n_slots
        self.block_size = block_size
        self.max_blocks = -(-max_seq_len // block_size)
        self.padding_slot = n_slots
        self.host = torch.zeros(n_slots + 1, self.max_blocks, dtype=torch.long)
        if identity:
            self.host[:n_slots] = torch.arange(1, 1 + n_slots * self.max_blocks).view(n_slots, self.max_blocks)
        on_cpu = torch.device(device).type == "cpu"
        self.device = self.host if on_cpu else self.host.to(device)
        self._dirty = False

    def assign(self, slot: int, first: int, blocks: list[int]) -> None:
        """Entries first.. of `slot` become `blocks`; the rest of the row points to the null block."""
        row = self.host[slot]
        if blocks:
            row[first : first + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        row[first + len(blocks) :] = NULL_BLOCK
        self._dirty = self.device is not self.host

    def on_device(self) -> torch.Tensor:
        if self._dirty:
            self.device.copy_(self.host, non_blocking=True)
            self._dirty = False
        return self.device


class KVCache:
    """Per-layer key/value pools [n_blocks + 1, n_kv_heads, block_size, head_dim] (block 0: null)."""

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        kernel_layout: bool = False,
    ) -> None:
        """kernel_layout: a bf16 cache that only the CPU attention kernel reads and writes, in
        its own layout within each block (kernels/decode_attention.py: bf16_blocks_as_rows)."""
        self.tables = BlockTables(n_slots, max_seq_len, block_size, device, identity=num_blocks is None)
        if num_blocks is None:
            num_blocks = n_slots * self.tables.max_blocks
        shape = (num_blocks + 1, n_kv_heads, block_size, head_dim)
        self.keys = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kernel_layout = kernel_layout

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def apply_kv_cache_dtype(model, name: str) -> None:
    """Ask `model` for a KV cache of this dtype (--kv-cache-dtype): "auto" leaves the choice to
    the model (Transformer.kv_cache_dtype), "float32", "bfloat16" or "fp8" (e4m3) fixes it."""
    choices = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    if name not in choices:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(choices)}; got {name!r}")
    model.kv_cache_dtype_request = choices[name]


# e4m3's largest finite value: keys and values beyond it are stored saturated, not as NaN.
FP8_MAX = 448.0


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as a cache of `dtype` stores them (fp8: saturated at e4m3's range, with
    no scale, as vLLM's default fp8 cache: keys and values of Llama models stay far inside it)."""
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position takes over all layers."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeroed cache memory. Unwritten positions must be finite (masked scores multiply them by
    zero), but writing gigabytes of zeros at start-up is slow on CPU: an anonymous mapping is
    zero-filled by the kernel page by page as positions are first written."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private: Python's default shared mapping is shmem, which gets no transparent huge pages.
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Decode reads every row's keys each step: huge pages spare the TLB misses, as for the
        # weights (llamaserve/__init__.py).
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)


@dataclass
class AttentionPlan:
    """Which blocks a forward call reads and writes, and what each query may see."""

    write_blocks: torch.Tensor  # [B, T] block of each new token
    write_offsets: torch.Tensor  # [B, T] its position inside the block
    read_blocks: torch.Tensor  # [B, kv_len / block_size] each row's blocks, in position order
    kv_len: int
    mask: torch.Tensor  # [B, 1, T, kv_len] bool, True where a key is visible
    # Built on the device from tensors only (plan_on_device): attention runs batched, never per
    # row from Python, so the step can be captured (CUDA graphs, torch.compile).
    device_side: bool = False

    def gather(self, pool: torch.Tensor, row: int | None = None, length: int | None = None) -> torch.Tensor:
        """Each row's keys (or values) 0..kv_len of a layer's pool: [B, kv_heads, kv_len, hd];
        or one row's first `length` of them: [1, kv_heads, length, hd]."""
        table = self.read_blocks
        if self.device_side and row is None:
            # Gathered head-major ([kv_heads, B, n, block_size, hd]) and returned as a strided view:
            # one copy of the blocks instead of two (gather, then transpose); decode on the device
            # reads every row's whole table, so this copy is most of its attention traffic.
            heads_first = pool.transpose(0, 1)[:, table]
            return heads_first.reshape(pool.shape[1], table.shape[0], -1, pool.shape[3]).transpose(0, 1)
        if row is not None:
            table = table[row : row + 1, : -(-length // pool.shape[2])]
        rows, n = table.shape
        blocks = pool[table]  # [B, n, kv_heads, block_size, hd]
        out = blocks.transpose(1, 2).reshape(rows, pool.shape[1], n * pool.shape[2], pool.shape[3])
        return out if row is None else out[:, :, :length]


def plan_attention(positions: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> AttentionPlan:
    """positions: [B, T] absolute positions of the new tokens; slots: [B] block-table rows."""
    furthest = int(positions.max())
    if furthest >= cache.max_seq_len:
        raise ValueError(f"position {furthest} is beyond the cache length {cache.max_seq_len}")
    bs = cache.block_size
    n_blocks = furthest // bs + 1
    kv_len = n_blocks * bs
    tables = cache.tables.on_device()[slots]  # [B, max_blocks]
    key_pos = torch.arange(kv_len, device=positions.device)
    mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, kv_len]
    return AttentionPlan(tables.gather(1, positions // bs), positions % bs, tables[:, :n_blocks], kv_len, mask)


def plan_on_device(positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor, block_size: int) -> AttentionPlan:
    """plan_attention for one token per row without a host synchronisation: every row reads all
    its table's blocks (kv_len = the cache's length, a constant), so shapes never depend on
    the positions. positions: [B, 1]; tables: the cache's block tables on the device. The
    caller checks positions against the cache length (on the host, where it knows them)."""
    rows = tables.index_select(0, slots)  # [B, max_blocks]
    kv_len = tables.shape[1] * block_size
    key_pos = torch.arange(kv_len, device=positions.device)
    mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, 1, kv_len]
    return AttentionPlan(rows.gather(1, positions // block_size), positions % block_size, rows, kv_len, mask,
                         device_side=True)
