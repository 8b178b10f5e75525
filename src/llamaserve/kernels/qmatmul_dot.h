// The dot-product kernels of qmatmul.cpp, on CPUs with AVX512-BF16 and AVX512-VNNI: bf16
// weights times bf16 activations through `vdpbf16ps` (32 multiply-adds an instruction, 2x the
// fp32 FMA), and int4 weights times int8 activations through `vpdpbusd` (64, 4x).
//
// Why: from ~8 rows (decode of many users, prefill) the fp32 kernel runs at the core's FMA
// peak (Zen 5: ~105 G multiply-adds/s a core for bf16 at 32 rows, ~80 for int4), and both
// precisions fall behind llama.cpp there, which multiplies rounded activations the same way.
//
// Register tiles of ROWS rows x 64 columns: each weight vector loaded (and, for int4, widened)
// once and used for every row of the tile. Batch invariance holds as in the fp32 kernel: an
// output element is one accumulator updated by the same instructions in increasing k whatever
// the tile it lands in (int4: exact int32 sums per group, then a fixed fp32 combine per group).
//
// Layouts (qmatmul.py packs them), columns in blocks of 64, each block k-major:
//   bf16 pairs: uint32 [N/64, ceil(K/2), 64], bf16 of k even in the low half, k odd high.
//   int4 vnni:  uint32 [N/64, K/8, 64]: byte i holds q of k = 8j + i (low nibble) and
//               8j + 4 + i (high), so one AND and one shift give vpdpbusd's operands.
//               fp16 scale and offset [N/64, K/group, 2, 64] as in the int4 layout.

#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QMATMUL_DOT_FORMATS 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace llamaserve_dot {

constexpr int64_t BLOCK = 64;
constexpr int VECS = 4;
// Rows of a register tile: bf16 24 accumulators + 4 weight vectors + a broadcast, 29 of 32
// registers; int4 fewer, where GCC keeps the accumulators in registers.
#ifndef QMATMUL_BF16_ROWS
#define QMATMUL_BF16_ROWS 6
#endif
#ifndef QMATMUL_INT4_ROWS
#define QMATMUL_INT4_ROWS 4
#endif
constexpr int BF16_ROWS = QMATMUL_BF16_ROWS, INT4_ROWS = QMATMUL_INT4_ROWS;

// Rows' activations as the kernels read them (prepared once a call, row by row).
struct Inputs {
  const uint32_t* pairs;  // bf16: [rows, ceil(K/2)] bf16 pairs
  const uint32_t* quads;  // int4: [rows, K/4] int8 quadruples
  const float* scale;     // int4: [rows, groups] activation scale d (x ~= q * d)
  const float* offset;    // int4: [rows, groups] d * sum of the group's q (meets the weights' offset)
};

inline void store_tile(float* out, int64_t n, int64_t n0, int rows, const float (*tile)[BLOCK]) {
  const int64_t width = n - n0 < BLOCK ? n - n0 : BLOCK;
  #pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) std::memcpy(out + r * n + n0, tile[r], width * sizeof(float));
}

template <int R>
void bf16_tile(const Inputs& in, int64_t k, int64_t n, const uint32_t* weights, float* out, int64_t block,
               int64_t m0) {
  const int64_t pairs = (k + 1) / 2;
  const uint32_t* wb = weights + block * pairs * BLOCK;
  const uint32_t* x = in.pairs + m0 * pairs;
  __m512 acc[R][VECS];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[VECS];
    #pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wb + p * BLOCK + v * 16);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xs = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + p]));
      #pragma GCC unroll 8
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xs);
    }
  }
  alignas(64) float tile[R][BLOCK];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) _mm512_store_ps(tile[r] + v * 16, acc[r][v]);
  store_tile(out + m0 * n, n, block * BLOCK, R, tile);
}

// acc[r][v] += the nibbles at `shift` of 16 columns' words times row r's int8 quadruple.
template <int R>
inline void int4_step(__m512i (&acc)[R][VECS], const uint32_t* words, __m512i nibble, int shift, const uint32_t* x,
                      int64_t row_stride) {
  __m512i w[VECS];
#pragma GCC unroll 8
  for (int v = 0; v < VECS; ++v)
    w[v] = _mm512_and_si512(_mm512_srli_epi32(_mm512_loadu_si512(words + v * 16), shift), nibble);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i xs = _mm512_set1_epi32(static_cast<int>(x[r * row_stride]));
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], w[v], xs);
  }
}

// out = sum over groups of d * s * (q_w . q_x) + (d * sum q_x) * offset, in group order.
template <int R>
void int4_tile(const Inputs& in, int64_t k, int64_t n, int64_t group, const uint32_t* weights,
               const uint16_t* aux, float* out, int64_t block, int64_t m0) {
  const int64_t quads = k / 4, groups = k / group, octets = group / 8;
  const uint32_t* wb = weights + block * (k / 8) * BLOCK;
  const uint16_t* sb = aux + block * groups * 2 * BLOCK;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  alignas(64) float tile[R][BLOCK] = {};
  for (int64_t g = 0; g < groups; ++g) {
    // The group's int32 sums q_w . q_x: exact, so their order does not matter.
    const uint32_t* wg = wb + g * octets * BLOCK;
    const uint32_t* x = in.quads + m0 * quads + g * (group / 4);
    __m512i acc[R][VECS];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 8
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_si512();
    for (int64_t j = 0; j < octets; ++j) {  // k = 8j..8j+3 in the low nibbles, 8j+4..8j+7 high
      const uint32_t* wj = wg + j * BLOCK;
      int4_step<R>(acc, wj, nibble, 0, x + 2 * j, quads);
      int4_step<R>(acc, wj, nibble, 4, x + 2 * j + 1, quads);
    }
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) {
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 2 * g * BLOCK + v * 16)));
      const __m512 offset =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (2 * g + 1) * BLOCK + v * 16)));
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (m0 + r) * groups + g;
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][v]), _mm512_set1_ps(in.scale[rg]));
        __m512 o = _mm512_fmadd_ps(dot, scale, _mm512_load_ps(tile[r] + v * 16));
        o = _mm512_fmadd_ps(_mm512_set1_ps(in.offset[rg]), offset, o);
        _mm512_store_ps(tile[r] + v * 16, o);
      }
    }
  }
  store_tile(out + m0 * n, n, block * BLOCK, R, tile);
}

// Every row tile of one column block: full tiles of ROWS, then one of the remainder.
template <int ROWS, class Tile>
void column_block(int64_t rows, Tile&& tile) {
  int64_t m = 0;
  for (; m + ROWS <= rows; m += ROWS) tile(std::integral_constant<int, ROWS>{}, m);
  switch (rows - m) {
    case 7: if constexpr (ROWS > 7) tile(std::integral_constant<int, 7>{}, m); break;
    case 6: if constexpr (ROWS > 6) tile(std::integral_constant<int, 6>{}, m); break;
    case 5: tile(std::integral_constant<int, 5>{}, m); break;
    case 4: tile(std::integral_constant<int, 4>{}, m); break;
    case 3: tile(std::integral_constant<int, 3>{}, m); break;
    case 2: tile(std::integral_constant<int, 2>{}, m); break;
    case 1: tile(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

}  // namespace llamaserve_dot

#endif
