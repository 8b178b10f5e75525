"""Tensor parallelism over torch.distributed: spawning ranks, torchrun, rank 0 and followers.

The model itself splits heads, FFN columns and vocabulary by `tp.size` (model/parallel.py) and
the loader reads each rank's slices (weights/loader.py `tp_part`); this package runs the ranks.
"""

from llamaserve.parallel.follower import maybe_follow
from llamaserve.parallel.group import LoadSpec, torchrun_rank
from llamaserve.parallel.leader import LeaderModel, TensorParallelError, load_parallel_model

__all__ = ["LeaderModel", "LoadSpec", "TensorParallelError", "load_parallel_model", "maybe_follow", "torchrun_rank"]
