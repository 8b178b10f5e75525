"""Rank 0: the model the engine sees, which makes every other rank run the same call.

`load_parallel_model` returns a LoadedModel whose `.model` is a `LeaderModel`: the engine calls
it exactly like a Transformer (forward, new_cache, args, device, dtype). Each call is first
broadcast to the followers, then run locally; the Transformer's all-reduces join the ranks'
partial results and the logits come back whole (vocab gathered) on rank 0, where sampling runs.

Launching: on one machine rank 0 starts ranks 1..N-1 itself as subprocesses (a file store in a
temp dir, so no port has to be chosen). Under torchrun every rank runs the same command; rank
0 gets here and the others go to `follower.maybe_follow`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import torch

from llamaserve.model.kv_cache import BLOCK_SIZE
from llamaserve.model.cuda_graphs import CapturedDecode
from llamaserve.parallel import protocol
from llamaserve.parallel.group import (
    LoadSpec,
    barrier,
    init_group,
    leave_group,
    load_rank_model,
    rank_device,
    set_threads,
    torchrun_rank,
)

log = logging.getLogger("llamaserve.parallel")


class TensorParallelError(RuntimeError):
    """A rank died or the group broke; this engine cannot run any more."""


class LeaderModel:
    """Rank 0's shard of the model, driving the other ranks through the control group."""

    def __init__(self, model, ctrl, processes: list[subprocess.Popen] | None = None, exit_on_rank_death: bool = False,
                 cleanup_dir: str | None = None) -> None:
        self.model = model
        self.ctrl = ctrl
        self.world_size = model.tp.size
        self.processes = processes or []
        self.exit_on_rank_death = exit_on_rank_death
        self._cleanup_dir = cleanup_dir
        self._next_cache_id = 0
        self._freed: list[int] = []
        self._broken: str | None = None
        self._closed = False
        self._stopping = False  # set before STOP goes out, so a follower's exit is not a death
        self._lock = threading.Lock()
        if self.processes:
            threading.Thread(target=self._watch_ranks, name="tp-rank-watch", daemon=True).start()
        atexit.register(self.close)

    # ---- what the engine reads -------------------------------------------------------------
    @property
    def args(self):
        return self.model.args

    @property
    def tp(self):
        return self.model.tp

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __getattr__(self, name: str):
        # Anything else (layers, output, ...) is the local shard's.
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    # ---- calls mirrored on every rank ------------------------------------------------------
    def _check(self) -> None:
        if self._broken:
            raise TensorParallelError(self._broken)
        if self._closed:
            raise TensorParallelError("the tensor-parallel group is closed")

    def _fail(self, exc: BaseException) -> TensorParallelError:
        dead = self._dead_rank()
        self._broken = dead or f"tensor-parallel group failed: {type(exc).__name__}: {exc}"
        return TensorParallelError(self._broken)

    def _flush_frees(self) -> None:
        while self._freed:
            protocol.send(self.ctrl, protocol.OP_FREE_CACHE, self._freed.pop())

    def new_cache(self, n_slots: int, max_seq_len: int, num_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        with self._lock:
            self._check()
            cache_id = self._next_cache_id
            self._next_cache_id += 1
            try:
                self._flush_frees()
                protocol.send(self.ctrl, protocol.OP_NEW_CACHE, cache_id, n_slots, max_seq_len, num_blocks or 0,
                              block_size)
            except RuntimeError as exc:
                raise self._fail(exc) from exc
            cache = self.model.new_cache(n_slots, max_seq_len, num_blocks=num_blocks, block_size=block_size)
            cache.tp_cache_id = cache_id
            # Freed at the next command, never from inside a GC callback mid-broadcast.
            weakref.finalize(cache, self._freed.append, cache_id)
            return cache

    def __call__(self, tokens, start_pos, slots, cache, all_logits: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        return self._mirrored((protocol.OP_FORWARD, cache.tp_cache_id, bsz, seqlen, int(all_logits)),
                              tokens, start_pos, slots, cache,
                              lambda: self.model(tokens, start_pos, slots, cache, all_logits=all_logits))

    forward = __call__

    def _mirrored(self, header: tuple[int, ...], tokens, start_pos, slots, cache, run_here):
        """Send a command and its batch to the other ranks, then run it here (`run_here`)."""
        with self._lock:
            self._check()
            try:
                self._flush_frees()
                protocol.send(self.ctrl, *header)
                protocol.send_batch(self.ctrl, tokens, start_pos, slots, cache.tables.host[slots.cpu()])
                return run_here()
            except ValueError:
                raise  # bad inputs, rejected identically by every rank before any collective
            except RuntimeError as exc:
                raise self._fail(exc) from exc

    def captured_decode(self, cache, rows: int) -> "MirroredDecode":
        """Decode steps of `rows` rows on captured steps of every rank (model/cuda_graphs.py)."""
        return MirroredDecode(self, cache, rows)

    # ---- rank health and shutdown ------------------------------------------------------------
    def _dead_rank(self) -> str | None:
        for rank, proc in enumerate(self.processes, start=1):
            code = proc.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}"
        return None

    def _watch_ranks(self) -> None:
        while not self._stopping:
            dead = self._dead_rank()
            if dead and not self._stopping:
                self._broken = dead
                if self.exit_on_rank_death:
                    # In the server's engine process: go down now so the supervisor restarts
                    # the whole group, instead of waiting for the next request to fail.
                    log.error("%s; stopping the engine", dead)
                    self._kill_followers()
                    os._exit(70)
                log.error("%s; the model cannot run any more", dead)
                return
            time.sleep(0.2)

    def _kill_followers(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()

    def close(self, timeout: float = 10.0) -> None:
        """Tell the followers to stop, wait for them, leave the group (idempotent)."""
        if self._closed:
            return
        self._stopping = True
        if self._lock.acquire(timeout=timeout):
            try:
                if not self._broken:
                    try:
                        protocol.send(self.ctrl, protocol.OP_STOP)
                    except RuntimeError:
                        pass
            finally:
                self._closed = True
                self._lock.release()
        self._closed = True
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        leave_group()
        if self._cleanup_dir:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)


class MirroredDecode:
    """Rank 0's captured decode step that has every other rank run its own alike.

    Each rank holds a CapturedDecode of its shard for the cache. The first step captures it on
    every rank (warm-up calls and the capture run the shard's collectives in the same order
    everywhere; NCCL collectives are captured into the graph), every later step replays it
    everywhere, so a step costs each rank one graph launch. Off CUDA the ranks run the step on
    its static buffers, which is how the CPU tests check the protocol."""

    def __init__(self, leader: LeaderModel, cache, rows: int) -> None:
        self.leader, self.cache, self.rows = leader, cache, rows
        self.local = CapturedDecode(leader.model, cache, rows)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """As CapturedDecode; tokens, positions and slots on the host (they go to every rank)."""
        if tokens.shape[0] != self.rows:
            raise ValueError(f"this captured step takes {self.rows} rows, got {tokens.shape[0]}")
        return self.leader._mirrored((protocol.OP_DECODE_STEP, self.cache.tp_cache_id, self.rows),
                                     tokens, positions, slots, self.cache, lambda: self.local(tokens, positions, slots))


def _spawn_followers(spec: LoadSpec, world_size: int, init_method: str) -> list[subprocess.Popen]:
    procs = []
    for rank in range(1, world_size):
        cfg = {"rank": rank, "world_size": world_size, "init_method": init_method, "spec": spec.to_dict(),
               "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())}
        # -c rather than -m: runpy would import the module a second time through the package.
        code = "import sys; from llamaserve.parallel.follower import main; sys.exit(main())"
        procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)]))
    return procs


def check_split(source, size: int) -> None:
    """ValueError unless heads, KV heads, FFN width and vocabulary split evenly over `size` ranks."""
    from llamaserve.config import BUILTIN_MODEL_ARGS
    from llamaserve.weights.loader import open_checkpoint

    if source is None or str(source) == "builtin":
        args = BUILTIN_MODEL_ARGS
    else:
        with open_checkpoint(source) as reader:  # config and tensor headers only
            args = reader.args
    problems = [f"{name} {value}" for name, value in (
        ("n_heads", args.n_heads), ("FFN width", args.hidden_dim), ("vocab_size", args.vocab_size)) if value % size]
    if args.n_kv_heads % size and size % args.n_kv_heads:
        problems.append(f"n_kv_heads {args.n_kv_heads}")
    if problems:
        raise ValueError(f"cannot split the model over {size} tensor-parallel ranks: "
                         f"{', '.join(problems)} not divisible by {size}")


def load_parallel_model(
    spec: LoadSpec,
    tensor_parallel: int,
    progress: bool = True,
    exit_on_rank_death: bool = False,
):
    """Load rank 0's shard and make sure every other rank has loaded its own.

    Under torchrun the group is the torchrun job (its world size must equal `tensor_parallel`);
    otherwise ranks 1..N-1 are started here as child processes. Returns the weights loader's
    LoadedModel with `.model` replaced by the LeaderModel.
    """
    info = torchrun_rank()
    processes: list[subprocess.Popen] = []
    cleanup_dir = None
    if info is not None:
        rank, world, local_rank = info
        if rank != 0:
            raise RuntimeError(f"load_parallel_model runs on rank 0; this is rank {rank} (use maybe_follow)")
        if tensor_parallel not in (1, world):
            raise ValueError(f"--tensor-parallel {tensor_parallel} does not match torchrun's world size {world}")
        init_method, ranks_here = "env://", int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    else:
        if tensor_parallel < 2:
            raise ValueError(f"tensor_parallel must be >= 2 to need a group, got {tensor_parallel}")
        world, local_rank, ranks_here = tensor_parallel, 0, tensor_parallel
        check_split(spec.source, world)  # before starting any process
        cleanup_dir = tempfile.mkdtemp(prefix="llamaserve-tp-")
        init_method = f"file://{os.path.join(cleanup_dir, 'store')}"
        processes = _spawn_followers(spec, world, init_method)
    set_threads(spec, ranks_here)
    device = rank_device(spec.device, local_rank)
    try:
        tp, ctrl = init_group(0, world, init_method, device)
        loaded = load_rank_model(spec, tp, device, progress)
        barrier(ctrl)  # every rank has loaded its slices
    except BaseException as exc:
        dead = next((f"rank {r} exited with code {p.poll()}" for r, p in enumerate(processes, 1) if p.poll() is not None), None)
        for proc in processes:
            proc.kill()
        leave_group()
        if cleanup_dir:
            shutil.rmtree(cleanup_dir, ignore_errors=True)
        if dead and isinstance(exc, RuntimeError):
            raise TensorParallelError(f"tensor-parallel start failed: {dead}") from exc
        raise
    loaded.model = LeaderModel(loaded.model, ctrl, processes, exit_on_rank_death, cleanup_dir)
    log.info("tensor parallel: %d ranks ready (%s)", world, "torchrun" if info else "spawned locally")
    return loaded
