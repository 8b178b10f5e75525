"""Decode steps replayed from a captured CUDA graph: one launch from the host per step instead
of hundreds (issue 14: an 8B-shaped model's eager step on an H200 spent most of its time
launching kernels from Python).

On CUDA every decode call has one shape (engine/runner.py: all slots plus one padding row, keys
read up to the cache's end), so one graph serves every step. The graph holds static input
buffers (tokens, positions, slots) and a static logits buffer; a step copies its inputs in,
replays, and copies the logits out. The captured function is `Transformer.decode_step`, which
reads nothing back to the host (tests/test_compile_decode.py compiles it with
torch.compile(fullgraph=True) on CPU), and which eager CUDA decode calls run too: a replay
launches the very kernels an eager call does, so it gives the same bits
(tests/test_cuda.py checks it on a GPU).

With tensor parallelism every rank holds a CapturedDecode of its shard, and rank 0 has each
step run on all of them (`captured_decode` -> parallel/leader.py: MirroredDecode): the warm-up
calls and the capture run the shard's collectives in the same order on every rank, and NCCL
collectives are captured into the graphs.

Off CUDA the same class runs the step on its static buffers, eagerly or through torch.compile
(`compile_backend`): what the CPU tests use to pin the buffer handling without a GPU.
LLAMASERVE_CUDA_GRAPHS=0 turns the graphs off (eager decode on CUDA).
"""

from __future__ import annotations

import os

import torch

ENV = "LLAMASERVE_CUDA_GRAPHS"
# Eager runs before capture: cuBLAS handles, workspaces and lazy module state are created
# outside the graph (allocations during capture would be frozen into it).
WARMUP_CALLS = 2


def graphs_apply(model, fixed_shape: bool) -> bool:
    """Whether decode on this model replays a CUDA graph: a CUDA Transformer, or rank 0 of a
    tensor-parallel group that can make every rank capture and replay alike (`captured_decode`),
    decode calls of one shape, and not switched off with LLAMASERVE_CUDA_GRAPHS=0."""
    return (
        fixed_shape
        and os.environ.get(ENV, "1") != "0"
        and torch.device(model.device).type == "cuda"
        and hasattr(model, "decode_step")
        and (getattr(getattr(model, "tp", None), "size", 1) == 1 or _own_capture(model) is not None)
    )


def _own_capture(model):
    # Looked up on the class: a tensor-parallel leader forwards unknown attributes to its shard.
    return getattr(type(model), "captured_decode", None)


def captured_decode(model, cache, rows: int):
    """The runner's captured step for `rows` rows of `cache`: the model's own where it has one
    (parallel/leader.py: each rank captures its shard's step, collectives included, and every
    replay is mirrored on every rank), else CapturedDecode."""
    own = _own_capture(model)
    return own(model, cache, rows) if own is not None else CapturedDecode(model, cache, rows)


class CapturedDecode:
    """model.decode_step for `rows` rows of `cache`, on static buffers; captured as a CUDA graph
    on CUDA (at the first call), else run eagerly or compiled with `compile_backend`."""

    def __init__(self, model, cache, rows: int, compile_backend: str | None = None) -> None:
        device = model.device
        self.model, self.cache, self.rows = model, cache, rows
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        # At capture every row is a padding row: warm-up and capture write only the null block
        # (model/kv_cache.py).
        self.slots = torch.full((rows,), cache.tables.padding_slot, dtype=torch.long, device=device)
        self.on_cuda = torch.device(device).type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        step = model.decode_step
        self._step = torch.compile(step, fullgraph=True, backend=compile_backend) if compile_backend else step

    def _run(self) -> torch.Tensor:
        with torch.inference_mode():
            return self._step(self.tokens, self.positions, self.slots, self.cache.tables.on_device(),
                              self.cache.keys, self.cache.values)

    def capture(self) -> None:
        """Warm up on a side stream, then record one step into a CUDA graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] for tokens [rows, 1] at positions [rows] of cache rows slots [rows]
        (on the host or the device: copied into the static buffers); a fresh tensor (the static
        buffer is overwritten by the next step)."""
        if tokens.shape[0] != self.rows:
            raise ValueError(f"this captured step takes {self.rows} rows, got {tokens.shape[0]}")
        if self.on_cuda and self.graph is None:
            self.capture()  # on the padding rows, before this step's inputs are in
        self.tokens.copy_(tokens.view(-1, 1), non_blocking=True)
        self.positions.copy_(positions.view(-1), non_blocking=True)
        self.slots.copy_(slots.view(-1), non_blocking=True)
        if not self.on_cuda:
            return self._run()
        self.cache.tables.on_device()  # a block table changed since the last step: copied in place
        self.graph.replay()
        return self.logits.clone()
