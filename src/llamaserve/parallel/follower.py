"""A rank other than 0: load this rank's weight slices, then repeat rank 0's model calls.

Every rank must run each forward (the model all-reduces inside every layer); only rank 0
samples. A follower exits when rank 0 says stop, when the group breaks (rank 0 or a peer died:
gloo reports the closed connection), or when its parent process is gone.

Run by our own launcher (`main`, with a JSON config argument), or by a command
running under torchrun (see `maybe_follow`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import torch

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


def follow(model, ctrl, device: torch.device) -> None:
    """Serve rank 0's commands until it says stop (raises if the group breaks)."""
    caches = {}
    captured = {}  # cache id -> this rank's CapturedDecode (OP_DECODE_STEP)
    while True:
        op, a, b, c, d, e, *_ = protocol.receive(ctrl)
        if op == protocol.OP_DECODE_STEP:
            tokens, positions, slots = _receive_batch(ctrl, caches[a], b, 1)
            step = captured.get(a)
            if step is None:
                step = captured[a] = CapturedDecode(model, caches[a], b)
            step(tokens, positions, slots)
        elif op == protocol.OP_FORWARD:
            tokens, start_pos, slots = _receive_batch(ctrl, caches[a], b, c)
            try:
                model(tokens.to(device), start_pos.to(device), slots.to(device), caches[a], all_logits=bool(d))
            except ValueError as exc:
                # Rank 0 got the same inputs and rejected them before any collective: carry on.
                log.debug("rank %d: forward rejected its inputs: %s", model.tp.rank, exc)
        elif op == protocol.OP_NEW_CACHE:
            caches[a] = model.new_cache(b, c, num_blocks=d or None, block_size=e)
        elif op == protocol.OP_FREE_CACHE:
            caches.pop(a, None)
            captured.pop(a, None)
        elif op == protocol.OP_STOP:
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {op}")


def _receive_batch(ctrl, cache, bsz: int, seqlen: int):
    """Tokens, positions and slots of rank 0's call; the slots' block tables copied into `cache`."""
    tokens, start_pos, slots, tables = protocol.receive_batch(ctrl, bsz, seqlen, cache.tables.max_blocks)
    for slot, row in zip(slots.tolist(), tables):
        cache.tables.assign(slot, 0, row.tolist())
    return tokens, start_pos, slots


def _exit_when_orphaned() -> None:
    # Our launcher (rank 0's process) died without telling us: do not linger holding memory.
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                log.error("rank 0's process is gone; exiting")
                os._exit(3)

    threading.Thread(target=watch, name="tp-orphan-watch", daemon=True).start()


def run_follower(spec: LoadSpec, rank: int, world_size: int, local_rank: int, init_method: str, ranks_here: int) -> int:
    set_threads(spec, ranks_here)
    device = rank_device(spec.device, local_rank)
    try:
        tp, ctrl = init_group(rank, world_size, init_method, device)
        loaded = load_rank_model(spec, tp, device, progress=False)
        barrier(ctrl)  # tell rank 0 this rank is loaded
        log.info("tensor-parallel rank %d/%d ready on %s", rank, world_size, device)
        follow(loaded.model, ctrl, device)
        return 0
    except Exception as exc:  # noqa: BLE001 - reported, then the process exits non-zero
        log.error("tensor-parallel rank %d/%d stopped: %s: %s", rank, world_size, type(exc).__name__, exc)
        return 1
    finally:
        leave_group()


def maybe_follow(spec: LoadSpec, tensor_parallel: int | None = None) -> int | None:
    """Under torchrun on a rank other than 0: follow rank 0 and return an exit code.

    Returns None on rank 0 and outside torchrun, where the caller goes on as usual. Commands
    (`serve`, `generate`, `demo`) call this first, so one command line serves every rank.
    """
    info = torchrun_rank()
    if info is None or info[0] == 0:
        return None
    rank, world, local_rank = info
    if tensor_parallel not in (None, 1, world):
        raise ValueError(f"--tensor-parallel {tensor_parallel} does not match torchrun's world size {world}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return run_follower(spec, rank, world, local_rank, "env://", ranks_here)


def main(argv: list[str] | None = None) -> int:
    cfg = json.loads((argv or sys.argv[1:])[0])
    rank = cfg["rank"]
    logging.basicConfig(
        level=cfg.get("log_level", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    _exit_when_orphaned()
    spec = LoadSpec(**cfg["spec"])
    return run_follower(spec, rank, cfg["world_size"], rank, cfg["init_method"], cfg["world_size"])


if __name__ == "__main__":
    sys.exit(main())
