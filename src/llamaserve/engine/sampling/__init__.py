"""Next-token choice for every row of a batch: greedy, temperature, top-k, top-p, min-p, penalties.

Order of operations, per row: penalties (repetition, presence, frequency) -> temperature ->
top-k -> top-p over what is left -> min-p -> one draw. `reference.py` is that order written
plainly, one row at a time in float64: the tests compare the fast paths below against it.

Every row's token depends only on that row's logits, its parameters and its own random stream,
never on the other rows: each operation here is either elementwise or a reduction along the
vocabulary done row by row (softmax, cumsum, max, top-k), and rows are grouped by the shape of
the work they need (the k of top-k), so a row sees the same kernels alone or in a full batch.
Randomness comes from a per-request `random.Random` (one uniform per draw, by inverse CDF), so
a seeded request gives the same tokens in any batch and on any device.

Costs are kept per feature: a batch of greedy rows is one pass over the logits (a two-level
arg-max, reduce.py); top-k rows work on k candidates (sampler.py); penalties touch only the
tokens a request has seen (state.py); only rows without top-k (plain temperature, or top-p/min-p
alone) compute exp over the whole vocabulary (whole.py: the interface; whole_kernel.py, a
compiled kernel a row per task on the CPU; whole_torch.py, torch ops elsewhere). Top-p / min-p
rows there draw from the whole distribution and keep the draw when its token is in the nucleus
(rejection sampling, exact: a kept draw follows the nucleus distribution); so a seeded row may
use a few uniforms for one token, and the rare row refused NUCLEUS_DRAWS times gets an exact
whole-row search (nucleus.py).

On GPUs the sampled rows go to the device sampler instead (on_device.py): every row in one
sequence of tensor operations with no host synchronisation, one uniform per token from a hash of
the request's seed and the token's number (counter_uniforms.py), exact in the same sense; the
same seed gives other tokens there than on the host sampler. LLAMASERVE_SAMPLER picks either.

Files: sampler.py (Sampler: grouping, greedy, top-k, logprobs), state.py (per-request state,
penalties), reduce.py (arg-max, top-k), draw.py (inverse-CDF draws, top-p/min-p mask of sorted
candidates), whole*.py and nucleus.py (whole-vocabulary rows), rows.py (row selection, buffers),
on_device.py and counter_uniforms.py (the device sampler), reference.py (the plain reference
sampler).
"""

from llamaserve.engine.sampling.reduce import fast_argmax, fast_topk
from llamaserve.engine.sampling.sampler import Sampler
from llamaserve.engine.sampling.state import SamplingState, uses_penalties

__all__ = ["Sampler", "SamplingState", "fast_argmax", "fast_topk", "uses_penalties"]
