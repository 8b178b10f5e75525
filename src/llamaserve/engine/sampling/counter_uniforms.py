"""Uniforms from a counter: the d-th uniform of a request is a hash of (its seed, d).

The device sampler (on_device.py) draws one uniform per token for every row of a batch at once,
on the device, with no state to carry between steps and no per-row Python: a request's d-th
uniform depends on nothing but its seed and d, so a seeded request gets the same uniforms alone,
in any batch, after a preemption, and on any device (the hash is integer arithmetic, exact
everywhere). The host sampler (sampler.py) keeps its per-request `random.Random`.

The mixer is a 32-bit integer finaliser (Chris Wellons' "lowbias32": xor-shift, multiply,
xor-shift, multiply, xor-shift), a bijection with good avalanche. It is written with operators
that Python ints and int64 tensors share, and multiplies in 16-bit halves so that no int64
product overflows.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
# Odd constant mixed between the key and the counter, so key 0 at draw 0 is not mix32(0) = 0.
_GOLDEN = 0x9E3779B9
# Bits of a 32-bit hash a uniform keeps: (bits + 1/2) / 2^23 takes 24 significant bits, an
# fp32 number's mantissa, so the uniform is exact in the float32 the draw computes in, and
# never 0 or 1.
UNIFORM_BITS = 23


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x < 2^32 without a product reaching 2^63."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32 of x in [0, 2^32): a Python int or an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A request's 32-bit key from its seed (any int: reduced to 64 bits, both halves mixed in)."""
    seed &= (1 << 64) - 1
    return mix32(mix32(seed & MASK32) ^ (seed >> 32) ^ _GOLDEN)


def uniform_bits(key, draw):
    """The 32-bit hash behind draw `draw` of key `key` (ints or int64 tensors)."""
    return mix32(mix32(key ^ (draw & MASK32)) ^ _GOLDEN)


def uniforms(keys: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), one per (key, draw) pair of int64 tensors of one shape."""
    top = uniform_bits(keys, draws) >> (32 - UNIFORM_BITS)
    return (top.to(torch.float32) + 0.5) * (1.0 / (1 << UNIFORM_BITS))
