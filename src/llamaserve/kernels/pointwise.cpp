// Row-wise fp32 ops of a decode step that torch runs as several dispatches each: the residual
// add with the RMSNorm after it, and SwiGLU's silu(gate) * up. At one token per row these
// cost more in dispatch than in arithmetic (measured: about 50 us per RMSNorm call on the
// benchmark model, 24 of them per step). Each row is computed from its own data in a fixed
// order, so results never depend on the rest of the batch.

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

using namespace llamaserve;

extern "C" {

// sum = x + delta, then normed = sum * rsqrt(mean(sum^2) + eps) * weight; with delta null,
// x itself is normed and sum is not written. All [rows, dim] contiguous, dim % 16 == 0.
int llamaserve_add_rms_norm(const float* x, const float* delta, const float* weight, float* sum, float* normed,
                            int64_t rows, int64_t dim, float eps) {
  if (rows <= 0 || dim <= 0 || dim % LANES != 0) return 1;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    if (delta != nullptr) {
      for (int64_t d = 0; d < dim; d += LANES) store(sum + r * dim + d, load(row + d) + load(delta + r * dim + d));
      row = sum + r * dim;
    }
    v16 squares{};
    for (int64_t d = 0; d < dim; d += LANES) {
      const v16 v = load(row + d);
      squares += v * v;
    }
    const float inv_rms = 1.0f / std::sqrt(lane_sum(squares) / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; d += LANES) store(normed + r * dim + d, load(row + d) * inv_rms * load(weight + d));
  }
  return 0;
}

// gate_up [rows, 2 * hidden] (gate, then up, as one fused projection gives them);
// out [rows, hidden] = silu(gate) * up. All contiguous, hidden % 16 == 0.
int llamaserve_silu_mul(const float* gate_up, float* out, int64_t rows, int64_t hidden) {
  if (rows <= 0 || hidden <= 0 || hidden % LANES != 0) return 1;
  const int64_t grain = hidden >= 16384 ? 1 : 16384 / hidden;  // small calls stay on one thread
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gate_up + r * 2 * hidden;
      const float* up = gate + hidden;
      for (int64_t i = 0; i < hidden; i += LANES) {
        const v16 g = load(gate + i);
        // silu(g) = g / (1 + e^-g) = g e^g / (1 + e^g): with e = exp(-|g|) both forms need
        // only a non-positive exponent.
        const v16 e = exp_nonpositive(g < 0.0f ? g : -g);
        const v16 silu = (g < 0.0f ? g * e : g) / (1.0f + e);
        store(out + r * hidden + i, silu * load(up + i));
      }
    }
  });
  return 0;
}

}  // extern "C"
