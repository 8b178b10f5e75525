// Activations rounded the way qmatmul.cpp's formats multiply them: to bf16 (bf16 weights) or to
// int8 per group of a row (int4 weights; x ~= q * d). kernels/qmatmul.py `rounded_inputs` is the
// same rule in torch (the reference and the fallback). Each row from its own values, so the
// rounding never depends on the rest of the batch; rows split between threads from 16 rows
// (prefill chunks), vectorised 16 lanes at a time with the same per-element rule as the tail.

#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace llamaserve_round {

using llamaserve::LANES;
using llamaserve::load;
using llamaserve::v16;
using llamaserve::v16i;
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16u16 __attribute__((vector_size(32), aligned(2)));
typedef int8_t v16s8 __attribute__((vector_size(16), aligned(1)));

// bf16 bits of x rounded to nearest even, as torch rounds (a NaN stays a NaN).
inline uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return ((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// 16 values rounded as bf16_bits does, the bf16 bits in each lane's top half (the low half is
// what rounding carried past them: shift it out, or mask it off for the rounded fp32 value).
inline v16u bf16_rounded(v16 x) {
  const v16u u = reinterpret_cast<const v16u&>(x);
  return (u & 0x7fffffffu) > 0x7f800000u ? v16u{} + 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
}

// A row of k values as bf16 bits (16 lanes at a time, the same rule as bf16_bits).
inline void bf16_row(const float* x, int64_t k, uint16_t* bits) {
  int64_t i = 0;
  for (; i + LANES <= k; i += LANES)
    *reinterpret_cast<v16u16*>(bits + i) = __builtin_convertvector(bf16_rounded(load(x + i)) >> 16, v16u16);
  for (; i < k; ++i) bits[i] = static_cast<uint16_t>(bf16_bits(x[i]));
}

// Lane reductions whose result does not depend on the order (a maximum, an integer sum): a
// shuffle tree where the CPU has AVX-512 (a lane-by-lane chain cost ~70 cycles a group).
inline float max_lanes(v16 v) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float m = v[0];
  for (int l = 1; l < LANES; ++l) m = std::max(m, v[l]);
  return m;
#endif
}

inline int32_t sum_lanes(v16i v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_epi32(reinterpret_cast<__m512i>(v));
#else
  int32_t total = 0;
  for (int l = 0; l < LANES; ++l) total += v[l];
  return total;
#endif
}

// One group of a row as int8: x ~= q * d with d = max |x| / 127 and q = x * (127 / max |x|)
// rounded to nearest even (torch.round's rule; a multiply, as llama.cpp's, not a division: 5x
// cheaper here), all 0 for a group of zeros. Also d * sum(q), which meets
// the weights' offsets (w = q_w * scale + offset). 16 lanes at a time, then one by one: the
// maximum and the integer sum are exact in any order, the rest is per element.
inline void quantize_group(const float* x, int64_t group, int8_t* q, float* d_out, float* qsum_out) {
  const int64_t whole = group - group % LANES;
  v16 vmax{};
  for (int64_t i = 0; i < whole; i += LANES) {
    const v16i bits = reinterpret_cast<const v16i&>(*reinterpret_cast<const v16*>(x + i)) & 0x7fffffff;
    const v16 a = reinterpret_cast<const v16&>(bits);
    vmax = a > vmax ? a : vmax;
  }
  float amax = max_lanes(vmax);
  for (int64_t i = whole; i < group; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f, inverse = 127.0f / amax;
  *d_out = d;
  if (amax == 0.0f) {
    std::memset(q, 0, group);
    *qsum_out = 0.0f;
    return;
  }
  // Adding and subtracting 1.5 * 2^23 rounds to nearest even (exact without -ffast-math).
  v16i vsum{};
  for (int64_t i = 0; i < whole; i += LANES) {
    const v16i qi = __builtin_convertvector((load(x + i) * inverse + 12582912.0f) - 12582912.0f, v16i);
    *reinterpret_cast<v16s8*>(q + i) = __builtin_convertvector(qi, v16s8);
    vsum += qi;
  }
  int32_t sum = sum_lanes(vsum);
  for (int64_t i = whole; i < group; ++i) {
    q[i] = static_cast<int8_t>((x[i] * inverse + 12582912.0f) - 12582912.0f);
    sum += q[i];
  }
  *qsum_out = d * static_cast<float>(sum);
}

// rows x k values as bf16 bits, each row `width` (>= k) apart; the pad of an odd k is 0.
inline void bf16_rows(const float* x, int64_t rows, int64_t k, int64_t width, uint16_t* bits) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bf16_row(x + r * k, k, bits + r * width);
      for (int64_t i = k; i < width; ++i) bits[r * width + i] = 0;
    }
  });
}

// rows x k values as int8 per group: q [rows, k], scale d and d * sum(q) [rows, k / group].
inline void int8_rows(const float* x, int64_t rows, int64_t k, int64_t group, int8_t* q, float* scale,
                      float* offset) {
  const int64_t groups = k / group;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < groups; ++g)
        quantize_group(x + r * k + g * group, group, q + r * k + g * group, &scale[r * groups + g],
                       &offset[r * groups + g]);
  });
}

}  // namespace llamaserve_round
