// Decode matmuls on compact weights: out[m, n] = sum_k x[m, k] * w[n, k] with fp32 activations
// and fp32 sums, the weights read in their stored form (bf16, int8 per output channel, or int4
// in groups along k with a scale and an offset each) and widened to fp32 in registers.
//
// Why: one-user decode is bound by reading the weights, so bytes per weight set its speed; a
// library int8/int4 matmul either converts the whole weight first (what QuantLinear did: 4x
// slower than fp32) or is slow on this hardware (aten._weight_int8pack_mm). Activations stay
// fp32: their rounding would add error, and the arithmetic is not what limits decode.
//
// Batch invariance by construction: every output element is one fp32 accumulator per 16-lane
// column group, updated by fused multiply-adds in increasing k, the same instruction sequence
// for a row whatever the number of rows, their values, the thread count or the row tile.
//
// Packed layout (kernels/qmatmul.py packs it): output columns in blocks of 64 (padded with
// zeros), each block k-major so a block streams as one sequential run of memory:
//   bf16: uint16 [N/64, K, 64]             int8: int8 [N/64, K, 64] + fp32 scale [N/64 * 64]
//   int4: uint8 [N/64, ceil(K/2), 64], low nibble k even, high nibble k odd, value q in 0..15,
//         w = q * scale + offset; fp16 scale and offset [N/64, K/group, 2, 64].

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace {

using namespace llamaserve;

constexpr int64_t BLOCK = 64;
constexpr int VECS = BLOCK / LANES;
#ifndef QMATMUL_TILE_ROWS
#define QMATMUL_TILE_ROWS 4
#endif
constexpr int TILE_ROWS = QMATMUL_TILE_ROWS;
enum Format : int64_t { BF16 = 16, INT8 = 8, INT4 = 4 };

typedef int8_t v16s8 __attribute__((vector_size(16), aligned(1)));
typedef uint8_t v16u8 __attribute__((vector_size(16), aligned(1)));
typedef uint16_t v16u16 __attribute__((vector_size(32), aligned(2)));

// a * b + c rounded once, on every path alike (ISO C++ mode does not contract a * b + c).
inline v16 fmadd(v16 a, v16 b, v16 c) {
#ifdef __AVX512F__
  return reinterpret_cast<v16>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
#else
  v16 r;
  for (int l = 0; l < LANES; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return r;
#endif
}

#ifdef __AVX512F__
inline v16 as_v16(__m512 x) { return reinterpret_cast<v16>(x); }
inline v16 from_int8(const int8_t* p) {
  return as_v16(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
inline v16 from_nibbles(v16u8 b) { return as_v16(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(reinterpret_cast<__m128i>(b)))); }
inline v16 from_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return as_v16(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
}
#else
inline v16 from_int8(const int8_t* p) {
  return __builtin_convertvector(__builtin_convertvector(*reinterpret_cast<const v16s8*>(p), v16i), v16);
}
inline v16 from_nibbles(v16u8 b) { return __builtin_convertvector(__builtin_convertvector(b, v16i), v16); }
inline v16 from_bf16(const uint16_t* p) {
  const v16i bits = __builtin_convertvector(*reinterpret_cast<const v16u16*>(p), v16i) << 16;
  return reinterpret_cast<const v16&>(bits);
}
#endif
inline v16 from_half(const uint16_t* p) {
#ifdef __AVX512F__
  return as_v16(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  v16 r;
  for (int l = 0; l < LANES; ++l) r[l] = static_cast<float>(reinterpret_cast<const _Float16*>(p)[l]);
  return r;
#endif
}

struct Problem {
  const float* x;
  int64_t rows, k, n, group;
  const void* weights;
  const void* aux;
  float* out;
};

// One row tile (R rows from m0) of one column block: acc[r][v] holds columns 16v..16v+15.
template <int R>
void tile(const Problem& p, Format format, int64_t block, int64_t m0) {
  v16 acc[R][VECS];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = splat(0.0f);
  const float* x = p.x + m0 * p.k;
  auto update = [&](const v16* w, int64_t k) {
    for (int r = 0; r < R; ++r) {
      const v16 xs = splat(x[r * p.k + k]);
      for (int v = 0; v < VECS; ++v) acc[r][v] = fmadd(w[v], xs, acc[r][v]);
    }
  };
  v16 w[VECS];
  if (format == INT4) {
    const int64_t pairs = (p.k + 1) / 2, groups = p.k / p.group;
    const uint8_t* wb = static_cast<const uint8_t*>(p.weights) + block * pairs * BLOCK;
    const uint16_t* sb = static_cast<const uint16_t*>(p.aux) + block * groups * 2 * BLOCK;
    for (int64_t g = 0; g < groups; ++g) {
      v16 scale[VECS], offset[VECS];
      for (int v = 0; v < VECS; ++v) {
        scale[v] = from_half(sb + (2 * g) * BLOCK + v * LANES);
        offset[v] = from_half(sb + (2 * g + 1) * BLOCK + v * LANES);
      }
      const int64_t end = (g + 1) * p.group;
      for (int64_t k = g * p.group; k < end; k += 2) {
        v16u8 bytes[VECS];
        for (int v = 0; v < VECS; ++v) bytes[v] = *reinterpret_cast<const v16u8*>(wb + (k / 2) * BLOCK + v * LANES);
        for (int v = 0; v < VECS; ++v) w[v] = fmadd(from_nibbles(bytes[v] & 15), scale[v], offset[v]);
        update(w, k);
        if (k + 1 == end) break;
        for (int v = 0; v < VECS; ++v) w[v] = fmadd(from_nibbles(bytes[v] >> 4), scale[v], offset[v]);
        update(w, k + 1);
      }
    }
  } else if (format == INT8) {
    const int8_t* wb = static_cast<const int8_t*>(p.weights) + block * p.k * BLOCK;
    for (int64_t k = 0; k < p.k; ++k) {
      for (int v = 0; v < VECS; ++v) w[v] = from_int8(wb + k * BLOCK + v * LANES);
      update(w, k);
    }
    const float* scale = static_cast<const float*>(p.aux) + block * BLOCK;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < VECS; ++v) acc[r][v] = acc[r][v] * load(scale + v * LANES);
  } else {
    const uint16_t* wb = static_cast<const uint16_t*>(p.weights) + block * p.k * BLOCK;
    for (int64_t k = 0; k < p.k; ++k) {
      for (int v = 0; v < VECS; ++v) w[v] = from_bf16(wb + k * BLOCK + v * LANES);
      update(w, k);
    }
  }
  const int64_t n0 = block * BLOCK, width = std::min(BLOCK, p.n - n0);
  for (int r = 0; r < R; ++r) {
    float* o = p.out + (m0 + r) * p.n + n0;
    if (width == BLOCK) {
      for (int v = 0; v < VECS; ++v) store(o + v * LANES, acc[r][v]);
    } else {
      float full[BLOCK];
      for (int v = 0; v < VECS; ++v) store(full + v * LANES, acc[r][v]);
      std::memcpy(o, full, width * sizeof(float));
    }
  }
}

}  // namespace

extern "C" {

// out [rows, n] = x [rows, k] times the packed weight (see the top of this file), all
// contiguous. format: 16 bf16, 8 int8, 4 int4 (group: k per scale, even or k itself).
int llamaserve_qmatmul(const float* x, int64_t rows, int64_t k, int64_t n, int64_t format, int64_t group,
                       const void* weights, const void* aux, float* out) {
  if (rows < 0 || k <= 0 || n <= 0) return 1;
  if (format != BF16 && format != INT8 && format != INT4) return 2;
  if (format == INT4 && (group <= 0 || k % group != 0 || (group % 2 != 0 && group != k))) return 3;
  const Problem p{x, rows, k, n, group, weights, aux, out};
  const Format f = static_cast<Format>(format);
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  // Threads split the column blocks; each block's weights stay in cache across its row tiles.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t m = 0;
      for (; m + TILE_ROWS <= rows; m += TILE_ROWS) tile<TILE_ROWS>(p, f, b, m);
      switch (rows - m) {
        case 7: tile<7>(p, f, b, m); break;
        case 6: tile<6>(p, f, b, m); break;
        case 5: tile<5>(p, f, b, m); break;
        case 4: tile<4>(p, f, b, m); break;
        case 3: tile<3>(p, f, b, m); break;
        case 2: tile<2>(p, f, b, m); break;
        case 1: tile<1>(p, f, b, m); break;
        default: break;
      }
    }
  });
  return 0;
}

}  // extern "C"
