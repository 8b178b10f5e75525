"""What a model prepared for serving tells the runner: `model.prepare_for_serving()` returns it
(model/cpu_backend.py for the Llama transformer, model/mock.py for the mock)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamaserve.model.cpu_linear import CPU_ROW_STABLE_MIN


def _no_linear_layers(max_rows: int) -> bool:
    return True


@dataclass(frozen=True)
class ServingPlan:
    # Every matmul gives a row the same bits for any row count from one up: decode pads nothing.
    rows_independent: bool = False
    # A prompt row's keys, values and logits are the same wherever the prompt is cut into chunks:
    # the scheduler may reuse a cached prefix at any block boundary.
    prefill_chunk_invariant: bool = False
    # Fewest CPU decode rows from which the linear layers give a row bits that do not depend on
    # the row count (model/cpu_linear.py) ...
    stable_from_rows: int = CPU_ROW_STABLE_MIN
    # ... and whether this process's CPU keeps that up to a row count (model/row_stability.py;
    # asked once, by the runner, where it matters).
    rows_stable: Callable[[int], bool] = _no_linear_layers
