// Whole-vocabulary sampling for rows without top-k (temperature, top-p, min-p), one row per
// task: exp(x / T - max) written over the row, chunk sums, inverse-CDF draws and the exact
// nucleus test of each draw. In torch this is ~50 small ops per batch plus passes over 16 MB of
// logits; here a row is read from memory once and the rest stays in cache. A row is computed by
// one thread in a fixed order from its own numbers, so its token never depends on the batch.

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

using namespace llamaserve;

namespace {

constexpr int64_t CHUNK = 256;  // tokens per chunk of the two-level inverse CDF

// Sum of x[0..n) with 16 lanes, the tail added to the first lanes, lanes summed in order.
inline float chunk_sum(const float* x, int64_t n) {
  v16 acc{};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) acc += load(x + i);
  for (int l = 0; i < n; ++i, ++l) acc[l] += x[i];
  return lane_sum(acc);
}

// Sum of the x[i] <= value, the same way.
inline float chunk_sum_at_or_below(const float* x, int64_t n, float value) {
  v16 acc{};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const v16 w = load(x + i);
    acc += w <= value ? w : 0.0f;
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += x[i] <= value ? x[i] : 0.0f;
  return lane_sum(acc);
}

// exp(x * inv - shift) in place over x[0..n); the arguments are <= 0 (shift is the row's max).
inline void weights_in_place(float* x, int64_t n, float inv, float shift) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) store(x + i, exp_nonpositive(load(x + i) * inv - shift));
  if (i < n) {
    float tail[LANES];
    for (int l = 0; l < LANES; ++l) tail[l] = i + l < n ? x[i + l] * inv - shift : 0.0f;
    const v16 w = exp_nonpositive(load(tail));
    for (int l = 0; i + l < n; ++l) x[i + l] = w[l];
  }
}

}  // namespace

extern "C" {

// x [rows, vocab] fp32 contiguous, overwritten with each row's weights exp(x / T - max(x / T)).
// Per row: inv_temp (1 / T > 0), top_p in (0, 1], min_p in [0, 1) (a fraction of the largest
// weight, which is 1 here), and `draws` uniforms in [0, 1) used in order until a draw is kept.
// tokens[r]: the kept token; -1 when every draw was refused (the caller searches the nucleus
// exactly), -2 when the row's maximum is not finite (nothing was written to that row).
int llamaserve_sample_whole(float* x, int64_t rows, int64_t vocab, const float* inv_temp, const float* top_p,
                            const float* min_p, const double* uniforms, int64_t draws, int64_t* tokens) {
  if (rows <= 0 || vocab <= 0 || draws <= 0) return 1;
  const int64_t n_chunks = (vocab + CHUNK - 1) / CHUNK;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mass(n_chunks);
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * vocab;
      v16 top_lanes = splat(-std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + LANES <= vocab; i += LANES) {
        const v16 v = load(row + i);
        top_lanes = v > top_lanes ? v : top_lanes;
      }
      float top = -std::numeric_limits<float>::infinity();
      for (int l = 0; l < LANES; ++l) top = top_lanes[l] > top ? top_lanes[l] : top;
      for (; i < vocab; ++i) top = row[i] > top ? row[i] : top;
      if (!std::isfinite(top) || std::isnan(top)) {
        tokens[r] = -2;
        continue;
      }
      const float inv = inv_temp[r];
      const float shift = top * inv;  // max of x * inv: rounding is monotone
      double total = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t lo = c * CHUNK, n = std::min(CHUNK, vocab - lo);
        weights_in_place(row + lo, n, inv, shift);
        mass[c] = chunk_sum(row + lo, n);
        total += mass[c];
      }

      tokens[r] = -1;
      float floor_weight = -1.0f;  // a refused weight refuses every weight at or below it
      for (int64_t d = 0; d < draws; ++d) {
        const double target = uniforms[r * draws + d] * total;
        double below = 0.0;
        int64_t chunk = -1;
        bool found = false;
        for (int64_t c = 0; c < n_chunks && !found; ++c) {
          if (mass[c] > 0.0f) chunk = c;
          found = below + mass[c] > target;
          if (!found) below += mass[c];
        }
        if (chunk < 0) break;
        const int64_t lo = chunk * CHUNK, n = std::min(CHUNK, vocab - lo);
        // Should rounding put the target past the end: the last token with weight.
        const double inner = found ? target - below : std::numeric_limits<double>::infinity();
        double run = 0.0;
        int64_t token = -1;
        for (int64_t k = 0; k < n; ++k) {
          if (row[lo + k] > 0.0f) token = lo + k;
          run += row[lo + k];
          if (run > inner) break;
        }
        if (token < 0) continue;
        const float weight = row[token];
        bool kept = weight >= min_p[r] && weight > floor_weight;
        if (kept && top_p[r] < 1.0f) {
          // Kept when the mass strictly above the weight is below top_p * total, i.e. the mass at
          // or below it exceeds (1 - top_p) * total; that running sum only grows, so it stops
          // as soon as it does.
          const double need = (1.0 - static_cast<double>(top_p[r])) * total;
          double at_or_below = 0.0;
          kept = false;
          for (int64_t c = 0; c < n_chunks && !kept; ++c) {
            const int64_t clo = c * CHUNK;
            at_or_below += chunk_sum_at_or_below(row + clo, std::min(CHUNK, vocab - clo), weight);
            kept = at_or_below > need;
          }
        }
        if (kept) {
          tokens[r] = token;
          break;
        }
        floor_weight = weight > floor_weight ? weight : floor_weight;
      }
    }
  });
  return 0;
}

}  // extern "C"
