"""Joining the tensor-parallel group: our own spawned ranks (file store) or torchrun (env://)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llamaserve.devices import resolve_device, to_dtype
from llamaserve.model.parallel import TensorParallel

# A model call whose peers do not answer within this long fails (a hung or lost rank).
COMPUTE_TIMEOUT_S = float(os.environ.get("LLAMASERVE_TP_TIMEOUT_S", "120"))
# Followers wait on the control group for the next step; an idle server may send none for days.
CONTROL_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads; JSON-able so it can travel on a follower's command line."""

    source: str | None = None
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda": each rank takes cuda:<local rank>
    quantize: str | None = None
    cache_root: str | None = None
    threads: int = 0  # torch threads per rank (0: cores / ranks on this machine)
    kv_cache_dtype: str = "auto"  # every rank's cache stores the same (EngineArgs.kv_cache_dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "GROUP_RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        return None


def rank_device(device: str, local_rank: int) -> torch.device:
    dev = resolve_device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" else dev


def set_threads(spec: LoadSpec, ranks_here: int) -> None:
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks_here)))


@dataclass(frozen=True)
class GroupTP(TensorParallel):
    """TensorParallel over a standalone process group.

    The groups are not torch.distributed's global default group, so one process can hold several
    (tests, or an application that already uses torch.distributed for its own purposes), and
    closing one leaves no global state behind.
    """

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)


def _new_group(store, rank: int, world_size: int, backend: str, timeout: timedelta):
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def init_group(rank: int, world_size: int, init_method: str, device: torch.device):
    """Join the group; returns (TensorParallel for the model, gloo control group)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=COMPUTE_TIMEOUT_S)
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    compute = _new_group(dist.PrefixStore("llamaserve/tp/", store), rank, world_size, backend, timeout)
    ctrl = _new_group(dist.PrefixStore("llamaserve/ctrl/", store), rank, world_size, "gloo", CONTROL_TIMEOUT)
    return GroupTP(world_size, rank, compute), ctrl


def barrier(ctrl) -> None:
    ctrl.barrier().wait()


def load_rank_model(spec: LoadSpec, tp: TensorParallel, device: torch.device, progress: bool):
    from llamaserve.model.kv_cache import apply_kv_cache_dtype
    from llamaserve.weights import load_model

    loaded = load_model(
        spec.source, dtype=to_dtype(spec.dtype), device=device, tp=tp, progress=progress,
        quantize=spec.quantize, cache_root=spec.cache_root,
    )
    apply_kv_cache_dtype(loaded.model, spec.kv_cache_dtype)
    # Every rank packs its own shard (rank 0's engine cannot reach the others' layers).
    loaded.model.pack_weights()
    return loaded


def leave_group() -> None:
    """Nothing global to undo: the groups are standalone objects, closed when dropped."""
