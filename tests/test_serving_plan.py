"""The one interface between the runner and a model's serving backend (model/serving.py,
model/cpu_backend.py): the runner pads decode calls by the plan the model hands back, and the
model's logits are row-major on every CPU path."""

import pytest
import torch

from llamaserve.config import ModelArgs
from llamaserve.engine.runner import ModelRunner
from llamaserve.model.llama import Transformer
from llamaserve.model.serving import ServingPlan
from llamaserve.weights.builtin import random_state_dict

from engine_util import ScriptedModel


class PlannedModel(ScriptedModel):
    def __init__(self, plan: ServingPlan) -> None:
        super().__init__([1, 2, 3], prompt_len=2)
        self.plan = plan

    def prepare_for_serving(self) -> ServingPlan:
        return self.plan


def test_the_runner_pads_decode_calls_as_the_plan_says():
    asked = []

    def unstable(max_rows: int) -> bool:
        asked.append(max_rows)
        return False

    assert ModelRunner(PlannedModel(ServingPlan()), max_users=8, max_seq_len=32).min_decode_rows == 2
    assert ModelRunner(PlannedModel(ServingPlan(rows_stable=unstable)), max_users=8, max_seq_len=32).min_decode_rows == 8
    assert asked == [8]
    assert ModelRunner(PlannedModel(ServingPlan(stable_from_rows=3)), max_users=8, max_seq_len=32).min_decode_rows == 3
    independent = ServingPlan(rows_independent=True, rows_stable=unstable)
    assert ModelRunner(PlannedModel(independent), max_users=8, max_seq_len=32).min_decode_rows == 1
    assert asked == [8]  # rows that are independent need no check


def _model(dtype: torch.dtype) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3, std=0.1), strict=False)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_logits_are_row_major_on_every_cpu_path(dtype, packed, kernels):
    model = _model(dtype)
    if packed:
        model.pack_weights()
    if not kernels:
        model.decode_kernels_fit = lambda: False
    cache = model.new_cache(3, 32)
    prompt = model(torch.arange(1, 13).view(3, 4), torch.zeros(3, dtype=torch.long), torch.arange(3), cache,
                   all_logits=True)
    decode = model(torch.tensor([[5], [6], [7]]), torch.full((3,), 4), torch.arange(3), cache)
    assert prompt.shape == (3, 4, 256) and prompt.is_contiguous()
    assert decode.shape == (3, 256) and decode.is_contiguous()


def test_the_transformers_plan_reports_its_packing():
    fp32 = _model(torch.float32).prepare_for_serving()
    assert not fp32.rows_independent and not fp32.prefill_chunk_invariant and fp32.rows_stable(8)
    model = _model(torch.bfloat16)
    plan = model.prepare_for_serving()
    assert model.packed
    assert plan.rows_independent == model.rows_independent
    assert plan.prefill_chunk_invariant == model.prefill_chunk_invariant
