// Matmuls on compact weights: out[m, n] = sum_k x[m, k] * w[n, k] with fp32 sums, the
// weights read in their stored form (bf16, int8 per output channel, or int4 in groups along k
// with a scale and an offset each).
//
// Why: one-user decode is bound by reading the weights, so bytes per weight set its speed; a
// library int8/int4 matmul either converts the whole weight first (what QuantLinear did: 4x
// slower than fp32) or is slow on this hardware (aten._weight_int8pack_mm).
//
// What each format multiplies, on every CPU and path alike (the torch fallback rounds the same
// way, kernels/qmatmul.py `rounded_inputs`): bf16 weights take the activations rounded to bf16
// (as torch's and llama.cpp's bf16 matmuls do); int4 weights take them rounded to int8 per
// weight group (x ~= q * d, d = max |x| / 127, as llama.cpp's Q4 x Q8 dot products do); int8
// weights take fp32 activations. The rounding is what lets CPUs with AVX512-BF16 and VNNI
// multiply 2x (bf16) and 4x (int4) faster than in fp32 (qmatmul_dot.h); elsewhere the fp32
// kernel below multiplies the rounded values, widening each weight to fp32 in registers.
//
// Batch invariance by construction: every output element is one accumulator per 16-lane column
// group, updated in increasing k, the same instruction sequence for a row whatever the number
// of rows, their values, the thread count or the row tile; each row's activations are rounded
// from that row alone.
//
// Packed layout (kernels/qmatmul.py packs it): output columns in blocks of 64 (padded with
// zeros), each block k-major so a block streams as one sequential run of memory:
//   bf16: uint16 [N/64, K, 64]             int8: int8 [N/64, K, 64] + fp32 scale [N/64 * 64]
//   int4: uint8 [N/64, ceil(K/2), 64], low nibble k even, high nibble k odd, value q in 0..15,
//         w = q * scale + offset; fp16 scale and offset [N/64, K/group, 2, 64].
//   bf16 pairs and int4 vnni: qmatmul_dot.h (formats 17 and 5, on CPUs that have them).

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qmatmul_dot.h"
#include "qmatmul_round.h"
#include "vec.h"

namespace {

using namespace llamaserve;

constexpr int64_t BLOCK = 64;
constexpr int VECS = BLOCK / LANES;
#ifndef QMATMUL_TILE_ROWS
#define QMATMUL_TILE_ROWS 4
#endif
constexpr int TILE_ROWS = QMATMUL_TILE_ROWS;
enum Format : int64_t { BF16 = 16, INT8 = 8, INT4 = 4, BF16_PAIRS = 17, INT4_VNNI = 5 };

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

// The activations of a call as its format multiplies them (see the top of this file), each row
// from its own values only (qmatmul_round.h). The buffers are the calling thread's, kept
// between calls: fresh ones cost page faults on every prefill call (~70 us of 128 x 2048 int4
// rounding, measured).
struct Rounded {
  std::vector<float>& values;         // fp32 kernel: the rounded activations [rows, k]
  std::vector<uint32_t>& words;       // dot kernels: bf16 pairs or int8 quadruples
  std::vector<float>& scale;          // int4: per row and group, d
  std::vector<float>& offset;         // int4: per row and group, d * sum(q)

  static std::vector<float>& buffer(int which) {
    thread_local std::vector<float> buffers[3];
    return buffers[which];
  }
  static std::vector<uint32_t>& word_buffer() {
    thread_local std::vector<uint32_t> buffer;
    return buffer;
  }

  Rounded(const float* x, int64_t rows, int64_t k, Format format, int64_t group)
      : values(buffer(0)), words(word_buffer()), scale(buffer(1)), offset(buffer(2)) {
    if (format == BF16 || format == BF16_PAIRS) {
      const int64_t width = 2 * ((k + 1) / 2);
      words.resize(rows * width / 2);
      uint16_t* bits = reinterpret_cast<uint16_t*>(words.data());
      llamaserve_round::bf16_rows(x, rows, k, width, bits);
      if (format == BF16) {
        values.resize(rows * k);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < k; ++i) {
            const uint32_t wide = static_cast<uint32_t>(bits[r * width + i]) << 16;
            std::memcpy(&values[r * k + i], &wide, sizeof(float));
          }
      }
    } else if (format == INT4 || format == INT4_VNNI) {
      const int64_t groups = k / group;
      words.resize((rows * k + 3) / 4);
      int8_t* q = reinterpret_cast<int8_t*>(words.data());
      scale.resize(rows * groups);
      offset.resize(rows * groups);
      llamaserve_round::int8_rows(x, rows, k, group, q, scale.data(), offset.data());
      if (format == INT4) {
        values.resize(rows * k);
        for (int64_t i = 0; i < rows * k; ++i) values[i] = static_cast<float>(q[i]) * scale[i / group];
      }
    }
  }
};

bool valid_group(Format format, int64_t k, int64_t group) {
  if (format == INT4) return group > 0 && k % group == 0 && (group % 2 == 0 || group == k);
  if (format == INT4_VNNI) return group > 0 && k % group == 0 && group % 8 == 0;
  return true;
}

#ifdef QMATMUL_DOT_FORMATS
void dot_matmul(const Rounded& rounded, int64_t rows, int64_t k, int64_t n, Format format, int64_t group,
                const void* weights, const void* aux, float* out) {
  using namespace llamaserve_dot;
  const Inputs in{rounded.words.data(), rounded.words.data(), rounded.scale.data(), rounded.offset.data()};
  const uint32_t* w = static_cast<const uint32_t*>(weights);
  at::parallel_for(0, (n + BLOCK - 1) / BLOCK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (format == BF16_PAIRS)
        column_block<BF16_ROWS>(rows, [&](auto r, int64_t m) { bf16_tile<decltype(r)::value>(in, k, n, w, out, b, m); });
      else
        column_block<INT4_ROWS>(rows, [&](auto r, int64_t m) {
          int4_tile<decltype(r)::value>(in, k, n, group, w, static_cast<const uint16_t*>(aux), out, b, m);
        });
    }
  });
}
#endif

}  // namespace

extern "C" {

// 1 where this build has the dot-product formats (17 bf16 pairs, 5 int4 vnni), else 0.
int llamaserve_qmatmul_dot_formats() {
#ifdef QMATMUL_DOT_FORMATS
  return 1;
#else
  return 0;
#endif
}

// out [rows, n] = x [rows, k] times the packed weight (see the top of this file), all
// contiguous. format: 16 bf16, 8 int8, 4 int4, 17 bf16 pairs, 5 int4 vnni (group: k per scale;
// int4: even or k itself; int4 vnni: a multiple of 8).
int llamaserve_qmatmul(const float* x, int64_t rows, int64_t k, int64_t n, int64_t format, int64_t group,
                       const void* weights, const void* aux, float* out) {
  if (rows < 0 || k <= 0 || n <= 0) return 1;
  bool known = format == BF16 || format == INT8 || format == INT4;
#ifdef QMATMUL_DOT_FORMATS
  known = known || format == BF16_PAIRS || format == INT4_VNNI;
#endif
  if (!known) return 2;
  const Format f = static_cast<Format>(format);
  if (!valid_group(f, k, group)) return 3;
  if (rows == 0) return 0;
  const Rounded rounded(x, rows, k, f, group);
#ifdef QMATMUL_DOT_FORMATS
  if (f == BF16_PAIRS || f == INT4_VNNI) {
    dot_matmul(rounded, rows, k, n, f, group, weights, aux, out);
    return 0;
  }
#endif
  const Problem p{f == INT8 ? x : rounded.values.data(), rows, k, n, group, weights, aux, out};
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
