// 16-float vector helpers shared by the kernels (GCC/Clang vector extensions).
//
// Sums are written as LANES independent partial sums combined in a fixed order; the compiler
// vectorises that as is, with no reassociation (no -ffast-math), so a result never depends on
// pointer alignment, thread count or the rest of the batch.

#pragma once

#include <cstdint>

namespace llamaserve {

constexpr int LANES = 16;
// Unaligned 16-float vectors (GCC/Clang vector extensions): AVX-512 registers where the CPU has
// them, two AVX2 halves elsewhere; the arithmetic is lane-wise, so the results are the same.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }
inline v16 splat(float x) { return v16{} + x; }

inline float lane_sum(v16 acc) {
  float total = 0.0f;
  for (int l = 0; l < LANES; ++l) total += acc[l];
  return total;
}

// exp for x <= 0 (softmax of scores minus their max, SiLU of -|x|): Cephes' single-precision
// polynomial on the remainder after taking out powers of two; about 1 ulp. Inputs below -87
// (under 1e-38) give 2^-126, not 0.
inline v16 exp_nonpositive(v16 x) {
  const v16 floor_x = splat(-87.0f);
  x = x < floor_x ? floor_x : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (exact without -ffast-math).
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const v16 r2 = r * r;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * reinterpret_cast<const v16&>(bits);
}

}  // namespace llamaserve
