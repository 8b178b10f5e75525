"""The built-in model: Llama-3-shaped, seeded random weights. Its output is gibberish by construction."""

from __future__ import annotations

import torch

from llamaserve.config import BUILTIN_MODEL_ARGS, BUILTIN_SEED, ModelArgs

BUILTIN_NAME = "llamaserve-builtin-random"
BUILTIN_WARNING = (
    "serving the built-in model: a small Llama-3-shaped network with seeded RANDOM weights; "
    "its output is gibberish by construction. Pass a weights directory for real answers."
)


def random_state_dict(args: ModelArgs, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Meta-layout weights ~ N(0, std), norms at 1, reproducible from the seed on any machine."""
    from llamaserve.weights.layout import expected_shapes

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shape)
        else:
            sd[name] = torch.randn(shape, generator=gen) * std
    return sd


def builtin_state_dict() -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    return BUILTIN_MODEL_ARGS, random_state_dict(BUILTIN_MODEL_ARGS, BUILTIN_SEED)
