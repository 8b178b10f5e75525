// Decode-step attention on CPU: RoPE on the new query/key, the cache write, and attention over
// each row's own visible keys, in one call per layer. The cache holds fp32, or bf16 (where the
// CPU has AVX512-BF16: half the bytes a step reads, and `vdpbf16ps` does twice the
// multiply-adds of an fp32 FMA; see "bf16 cache" below).
//
// Why a kernel of our own: at one new token per row, scaled_dot_product_attention plus the
// RoPE and cache-write ops cost more in dispatch and blocking than the arithmetic they do
// (measured: 13-17 ms of a 100 ms step at 32 users on the benchmark model). Every (row,
// kv-head) task here is computed by one thread with a fixed summation order, from its own
// row's data only, so a row's result has the same bits whatever the batch size, the other
// rows, the thread count or the key length of its neighbours: the batch invariance the engine
// promises holds by construction.

#include <ATen/Parallel.h>

#include "qmatmul_round.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace llamaserve;

constexpr int64_t MAX_HEAD_DIM = 256;

// Lane i of the result is the sum of the lanes of acc[i], always by the same tree
// (l + l^8, then ^4, ^2, ^1), so a key's score never depends on the keys beside it.
inline v16 transpose_sum(const v16* acc) {
  v16 half[8], quarter[4], eighth[2];
  for (int p = 0; p < 8; ++p)
    half[p] = __builtin_shufflevector(acc[2 * p], acc[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
            + __builtin_shufflevector(acc[2 * p], acc[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int p = 0; p < 4; ++p)
    quarter[p] = __builtin_shufflevector(half[2 * p], half[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + __builtin_shufflevector(half[2 * p], half[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int p = 0; p < 2; ++p)
    eighth[p] = __builtin_shufflevector(quarter[2 * p], quarter[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
              + __builtin_shufflevector(quarter[2 * p], quarter[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(eighth[0], eighth[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
       + __builtin_shufflevector(eighth[0], eighth[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Interleaved (even, odd) pairs times unit complex numbers (cos, sin), as Meta's RoPE.
inline void rope(const float* x, const float* rotation, float* out, int64_t head_dim) {
  for (int64_t i = 0; i < head_dim; i += 2) {
    const float a = x[i], b = x[i + 1], c = rotation[i], s = rotation[i + 1];
    out[i] = a * c - b * s;
    out[i + 1] = a * s + b * c;
  }
}

// scores[t0..t0+16) = scale * (query . key t) for the 16 keys of the tile starting at key t0
// (`tile` points at key t0); where the tile passes n_keys it repeats the last key. block_size is
// a multiple of 16, so a tile never straddles two blocks, and each key's dot product is the same
// sequence of operations wherever its block sits and whatever the other keys of the tile.
template <int64_t B>
inline void score_tile(const float* query, const float* tile, int64_t t0, int64_t n_keys, float scale,
                       float* scores) {
  v16 q[B];  // B known at compile time: the query stays in registers across the tile's keys
  for (int64_t b = 0; b < B; ++b) q[b] = load(query + b * LANES);
  v16 acc[LANES];
  for (int i = 0; i < LANES; ++i) {
    const float* key = tile + (std::min<int64_t>(t0 + i, n_keys - 1) - t0) * B * LANES;
    v16 sum = q[0] * load(key);
    for (int64_t b = 1; b < B; ++b) sum += q[b] * load(key + b * LANES);
    acc[i] = sum;
  }
  store(scores + t0, transpose_sum(acc) * scale);
}

inline void score_tile(const float* query, const float* tile, int64_t t0, int64_t n_keys, int64_t head_dim,
                       float scale, float* scores) {
  switch (head_dim) {
    case 64: return score_tile<4>(query, tile, t0, n_keys, scale, scores);
    case 128: return score_tile<8>(query, tile, t0, n_keys, scale, scores);
  }
  v16 acc[LANES];
  for (int i = 0; i < LANES; ++i) {
    const float* key = tile + (std::min<int64_t>(t0 + i, n_keys - 1) - t0) * head_dim;
    v16 sum = load(query) * load(key);
    for (int64_t d = LANES; d < head_dim; d += LANES) sum += load(query + d) * load(key + d);
    acc[i] = sum;
  }
  store(scores + t0, transpose_sum(acc) * scale);
}

// x rounded to the nearest bf16, kept as fp32 (x's bf16 bits followed by 16 zero bits).
inline v16 bf16_values(v16 x) {
  const llamaserve_round::v16u bits = llamaserve_round::bf16_rounded(x) & 0xffff0000u;
  return reinterpret_cast<const v16&>(bits);
}

// Softmax weights in place over scores[0..n_keys) (zeros after, up to the block end) and
// their total, in blocks of 16 summed lane-wise, then across lanes.
// Bf16: each weight rounded to bf16 (bf16_values) before it is stored and summed.
template <bool Bf16>
inline float softmax_weights(float* scores, int64_t n_keys) {
  // The maximum over whole tiles: a tile's lanes past n_keys repeat the last key's score
  // (score_tile), and a maximum is exact in any order, so this is the scalar scan's value.
  v16 tops = load(scores);
  for (int64_t t0 = LANES; t0 < n_keys; t0 += LANES) {
    const v16 x = load(scores + t0);
    tops = x > tops ? x : tops;
  }
  float top = tops[0];
  for (int l = 1; l < LANES; ++l) top = tops[l] > top ? tops[l] : top;
  v16 total{};
  const int64_t whole = n_keys / LANES * LANES;
  for (int64_t t0 = 0; t0 < whole; t0 += LANES) {
    v16 w = exp_nonpositive(load(scores + t0) - top);
    if constexpr (Bf16) w = bf16_values(w);
    store(scores + t0, w);
    total += w;
  }
  if (whole < n_keys) {
    v16 w = exp_nonpositive(load(scores + whole) - top);
    if constexpr (Bf16) w = bf16_values(w);
    for (int l = 0; l < LANES; ++l)
      if (whole + l >= n_keys) w[l] = 0.0f;
    store(scores + whole, w);
    total += w;
  }
  return lane_sum(total);
}

// acc[0..B) += weight * value[0..16B): B known at compile time, so the accumulators stay in
// registers through a block's keys.
template <int64_t B>
inline void accumulate_values(const float* s, const float* block_values, int64_t k0, int64_t k_end, float* sums) {
  v16 acc[B];
  for (int64_t b = 0; b < B; ++b) acc[b] = load(sums + b * LANES);
  for (int64_t k = k0; k < k_end; ++k) {
    const float* v = block_values + (k - k0) * B * LANES;
    for (int64_t b = 0; b < B; ++b) acc[b] += s[k] * load(v + b * LANES);
  }
  for (int64_t b = 0; b < B; ++b) store(sums + b * LANES, acc[b]);
}

inline void accumulate_values(int64_t blocks, const float* s, const float* block_values, int64_t k0, int64_t k_end,
                              float* sums) {
  switch (blocks) {
    case 4: return accumulate_values<4>(s, block_values, k0, k_end, sums);
    case 8: return accumulate_values<8>(s, block_values, k0, k_end, sums);
  }
  for (int64_t b = 0; b < blocks; ++b) {  // other head sizes: one 16-dim slice at a time, same sums
    v16 acc = load(sums + b * LANES);
    for (int64_t k = k0; k < k_end; ++k) acc += s[k] * load(block_values + (k - k0) * blocks * LANES + b * LANES);
    store(sums + b * LANES, acc);
  }
}

// Queries one (attend) call takes: a row's query heads of one KV head, or several rows' (a
// prefill chunk's consecutive rows).
constexpr int64_t MAX_QUERIES = 32;

// ---- bf16 cache -------------------------------------------------------------------------------
// Keys and values are stored rounded to bf16 (nearest even, as torch rounds), in blocks of 16
// positions laid out for `vdpbf16ps` (32 multiply-adds an instruction, fp32 sums):
//   keys, per block and KV head: uint32 [head_dim / 2][16]: dims (2i, 2i + 1) of position t at
//     [i][t], so one vector holds a dim pair of 16 keys and scores need no lane sums;
//   values, per block and KV head: uint32 [8][head_dim]: positions (2p, 2p + 1) of dim d at
//     [p][d], so one vector holds 16 dims of a key pair.
// A query is rounded to bf16 and each key's score summed over dim pairs in order; the softmax
// weights are rounded to bf16 and each output dim summed over key pairs in order; the total
// that divides them is the sum of the rounded weights: bf16 attention as on GPUs (flash
// attention multiplies bf16 P by V), each sum in one fixed order per (query, key) or (query,
// dim) whatever the other queries of the call, so the batch and chunk invariance above holds.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define ATTENTION_BF16_CACHE 1

constexpr int64_t BF16_BLOCK = 16;  // the layout's block: one tile of key lanes

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// The bf16 layout's writes: position t of a block (per KV head) gets key or value bits[0..head_dim).
inline void put_key(const uint16_t* bits, int64_t t, int64_t head_dim, uint16_t* block) {
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    block[(i * BF16_BLOCK + t) * 2] = bits[2 * i];
    block[(i * BF16_BLOCK + t) * 2 + 1] = bits[2 * i + 1];
  }
}

inline void put_value(const uint16_t* bits, int64_t t, int64_t head_dim, uint16_t* block) {
  for (int64_t d = 0; d < head_dim; ++d) block[((t / 2) * head_dim + d) * 2 + (t & 1)] = bits[d];
}

// scores[j][t0 + 16u + lane] = scale * (query j . key) for NQ queries and NT tiles of keys:
// NQ x NT independent chains, each over the dim pairs in order.
template <int NQ, int NT>
inline void score_tiles(const uint32_t* const* queries, const uint32_t* const* tiles, int64_t dim_pairs, float scale,
                        float* const* scores, int64_t t0) {
  __m512 acc[NQ][NT];
  for (int i = 0; i < NQ; ++i)
    for (int u = 0; u < NT; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < dim_pairs; ++dp) {
    __m512i keys[NT];
    for (int u = 0; u < NT; ++u) keys[u] = _mm512_loadu_si512(tiles[u] + dp * BF16_BLOCK);
    for (int i = 0; i < NQ; ++i) {
      const __m512bh q = as_bh(_mm512_set1_epi32(static_cast<int32_t>(queries[i][dp])));
      for (int u = 0; u < NT; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], q, as_bh(keys[u]));
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int u = 0; u < NT; ++u) store(scores[i] + t0 + u * LANES, reinterpret_cast<const v16&>(acc[i][u]) * scale);
}

template <int NQ>
inline void score_tiles(int nt, const uint32_t* const* queries, const uint32_t* const* tiles, int64_t dim_pairs,
                        float scale, float* const* scores, int64_t t0) {
  switch (nt) {
    case 4: return score_tiles<NQ, 4>(queries, tiles, dim_pairs, scale, scores, t0);
    case 3: return score_tiles<NQ, 3>(queries, tiles, dim_pairs, scale, scores, t0);
    case 2: return score_tiles<NQ, 2>(queries, tiles, dim_pairs, scale, scores, t0);
    default: return score_tiles<NQ, 1>(queries, tiles, dim_pairs, scale, scores, t0);
  }
}

// sums[j][0..VB*16) += weights[j] . values over key pairs [p0, p1) of one block (pairs: its
// value layout; weights[j]: the query's bf16 weight pairs from the block's first key): NQ x VB
// chains in pair order.
template <int NQ, int VB>
inline void value_pairs(const uint32_t* const* weights, const uint32_t* pairs, int64_t p0, int64_t p1,
                        float* const* sums) {
  __m512 acc[NQ][VB];
  for (int i = 0; i < NQ; ++i)
    for (int b = 0; b < VB; ++b) acc[i][b] = _mm512_loadu_ps(sums[i] + b * LANES);
  for (int64_t p = p0; p < p1; ++p) {
    __m512i values[VB];
    for (int b = 0; b < VB; ++b) values[b] = _mm512_loadu_si512(pairs + p * VB * LANES + b * LANES);
    for (int i = 0; i < NQ; ++i) {
      const __m512bh w = as_bh(_mm512_set1_epi32(static_cast<int32_t>(weights[i][p])));
      for (int b = 0; b < VB; ++b) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], w, as_bh(values[b]));
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int b = 0; b < VB; ++b) _mm512_storeu_ps(sums[i] + b * LANES, acc[i][b]);
}

// Queries a value_pairs call takes for VB vectors of output: NQ x VB accumulators and VB value
// vectors in 32 registers.
constexpr int value_queries(int vb) { return vb >= 16 ? 1 : std::min(4, 16 / vb); }

template <int VB>
inline void value_block(int64_t n, const uint32_t* const* weights, const uint32_t* pairs, const int64_t* pair_counts,
                        float* const* sums) {
  constexpr int NQ = value_queries(VB);
  for (int64_t j0 = 0; j0 < n; j0 += NQ) {
    const int64_t m = std::min<int64_t>(NQ, n - j0);
    // The pairs every query of the group has, together; then each query's own rest alone:
    // a query's chain is the same instructions in the same order either way.
    int64_t common = pair_counts[j0];
    for (int64_t j = j0; j < j0 + m; ++j) common = std::min(common, pair_counts[j]);
    if (m == NQ) value_pairs<NQ, VB>(weights + j0, pairs, 0, common, sums + j0);
    else
      for (int64_t j = j0; j < j0 + m; ++j) value_pairs<1, VB>(weights + j, pairs, 0, common, sums + j);
    for (int64_t j = j0; j < j0 + m; ++j)
      if (pair_counts[j] > common) value_pairs<1, VB>(weights + j, pairs, common, pair_counts[j], sums + j);
  }
}

// attend (below) for a bf16 cache in the layout above.
__attribute__((noinline)) void attend_bf16(int64_t n, const uint16_t* const* queries, const int64_t* n_keys,
                                           const uint16_t* key_cache, const uint16_t* value_cache,
                                           const int64_t* table, int64_t block_stride, int64_t head_offset,
                                           int64_t head_dim, float scale, float* scores, int64_t score_stride,
                                           uint32_t* weight_pairs, float* const* outs) {
  int64_t most = 0;
  for (int64_t j = 0; j < n; ++j) most = std::max(most, n_keys[j]);
  const uint32_t* q32[MAX_QUERIES];
  float* rows[MAX_QUERIES];
  for (int64_t j = 0; j < n; ++j) {
    q32[j] = reinterpret_cast<const uint32_t*>(queries[j]);
    rows[j] = scores + j * score_stride;
  }
  // Scores of every query for every tile up to `most` (lanes past a query's own keys are
  // overwritten below): groups of 4 queries x 4 tiles.
  const int64_t dim_pairs = head_dim / 2, n_tiles = (most + BF16_BLOCK - 1) / BF16_BLOCK;
  for (int64_t u0 = 0; u0 < n_tiles; u0 += 4) {
    const int nt = static_cast<int>(std::min<int64_t>(4, n_tiles - u0));
    const uint32_t* tiles[4];
    for (int u = 0; u < nt; ++u)
      tiles[u] = reinterpret_cast<const uint32_t*>(key_cache + table[u0 + u] * block_stride + head_offset);
    const int64_t t0 = u0 * BF16_BLOCK;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) score_tiles<4>(nt, q32 + j, tiles, dim_pairs, scale, rows + j, t0);
    switch (n - j) {
      case 3: score_tiles<3>(nt, q32 + j, tiles, dim_pairs, scale, rows + j, t0); break;
      case 2: score_tiles<2>(nt, q32 + j, tiles, dim_pairs, scale, rows + j, t0); break;
      case 1: score_tiles<1>(nt, q32 + j, tiles, dim_pairs, scale, rows + j, t0); break;
    }
  }
  float inv_total[MAX_QUERIES];
  for (int64_t j = 0; j < n; ++j) {
    // Lanes past the query's last key repeat its score, so the softmax's tile maximum is exact.
    float* row = rows[j];
    for (int64_t t = n_keys[j]; t % LANES; ++t) row[t] = row[n_keys[j] - 1];
    inv_total[j] = 1.0f / softmax_weights<true>(row, n_keys[j]);
    // The weights as bf16 pairs for value_pairs (exact: they are bf16 values, none subnormal).
    uint32_t* packed = weight_pairs + j * score_stride / 2;
    for (int64_t t0 = 0; t0 < n_keys[j]; t0 += LANES) {
      const __m256bh halves = _mm512_cvtneps_pbh(_mm512_loadu_ps(row + t0));
      std::memcpy(packed + t0 / 2, &halves, sizeof halves);
    }
  }
  alignas(64) float sums[MAX_QUERIES * MAX_HEAD_DIM];
  std::fill(sums, sums + n * head_dim, 0.0f);
  float* sum_rows[MAX_QUERIES];
  const uint32_t* weights[MAX_QUERIES];
  int64_t pair_counts[MAX_QUERIES];
  for (int64_t j = 0; j < n; ++j) sum_rows[j] = sums + j * head_dim;
  for (int64_t k0 = 0; k0 < most; k0 += BF16_BLOCK) {
    const uint32_t* pairs =
        reinterpret_cast<const uint32_t*>(value_cache + table[k0 / BF16_BLOCK] * block_stride + head_offset);
    // The queries that see this block (those first: rows of a run are in position order).
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t keys = std::min<int64_t>(BF16_BLOCK, n_keys[j] - k0);
      if (keys <= 0) continue;
      weights[m] = weight_pairs + j * score_stride / 2 + k0 / 2;  // past the query's last key: zeros
      pair_counts[m] = (keys + 1) / 2;
      sum_rows[m] = sums + j * head_dim;
      ++m;
    }
    switch (head_dim / LANES) {
      case 2: value_block<2>(m, weights, pairs, pair_counts, sum_rows); break;
      case 4: value_block<4>(m, weights, pairs, pair_counts, sum_rows); break;
      case 6: value_block<6>(m, weights, pairs, pair_counts, sum_rows); break;
      case 8: value_block<8>(m, weights, pairs, pair_counts, sum_rows); break;
      case 10: value_block<10>(m, weights, pairs, pair_counts, sum_rows); break;
      case 12: value_block<12>(m, weights, pairs, pair_counts, sum_rows); break;
      case 14: value_block<14>(m, weights, pairs, pair_counts, sum_rows); break;
      default: value_block<16>(m, weights, pairs, pair_counts, sum_rows); break;
    }
  }
  const int64_t blocks = head_dim / LANES;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < blocks; ++b) store(outs[j] + b * LANES, load(sums + j * head_dim + b * LANES) * inv_total[j]);
}
#endif

// outs[j] = softmax(scale * queries[j] . keys) . values over keys 0..n_keys[j] of one sequence
// and KV head, read in place through its block table, for n <= MAX_QUERIES queries at once:
// each tile of keys, and each block of values, is read from memory once for all of them and
// then from L1. Query j's result is the same operations in the same order whatever the other
// queries (and the thread, the call, the batch): so a row at a given position has the same bits
// in a decode step and in any prefill chunk. Not inlined, so every caller runs this same code.
__attribute__((noinline)) void attend(int64_t n, const float* const* queries, const int64_t* n_keys,
                                      const float* key_cache, const float* value_cache, const int64_t* table,
                                      int64_t block_stride, int64_t head_offset, int64_t block_size,
                                      int64_t head_dim, float scale, float* scores, int64_t score_stride,
                                      float* const* outs) {
  int64_t most = 0;
  for (int64_t j = 0; j < n; ++j) most = std::max(most, n_keys[j]);
  for (int64_t t0 = 0; t0 < most; t0 += LANES) {
    const float* tile = key_cache + table[t0 / block_size] * block_stride + head_offset + (t0 % block_size) * head_dim;
    for (int64_t j = 0; j < n; ++j)
      if (t0 < n_keys[j]) score_tile(queries[j], tile, t0, n_keys[j], head_dim, scale, scores + j * score_stride);
  }
  float inv_total[MAX_QUERIES];
  for (int64_t j = 0; j < n; ++j) inv_total[j] = 1.0f / softmax_weights<false>(scores + j * score_stride, n_keys[j]);
  // Keys outer, one accumulator per 16 dims: independent chains, each summed in key order. A
  // query's accumulators wait in `sums` (exact) while the others take the block.
  const int64_t blocks = head_dim / LANES;
  alignas(64) float sums[MAX_QUERIES * MAX_HEAD_DIM];
  std::fill(sums, sums + n * head_dim, 0.0f);
  for (int64_t k0 = 0; k0 < most; k0 += block_size) {
    const float* block_values = value_cache + table[k0 / block_size] * block_stride + head_offset;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t k_end = std::min<int64_t>(k0 + block_size, n_keys[j]);
      if (k0 < k_end)
        accumulate_values(blocks, scores + j * score_stride, block_values, k0, k_end, sums + j * head_dim);
    }
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < blocks; ++b) store(outs[j] + b * LANES, load(sums + j * head_dim + b * LANES) * inv_total[j]);
}

// 0 when the sizes are ones the kernel takes and every row's slot, position and blocks lie
// inside the cache; else the code the Python side explains.
inline int check_rows(const int64_t* block_tables, int64_t n_tables, int64_t max_blocks, int64_t n_blocks,
                      int64_t block_size, const int64_t* slots, const int64_t* positions, int64_t rows,
                      int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (rows <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim % LANES != 0 ||
      head_dim > MAX_HEAD_DIM || block_size <= 0 || block_size % LANES != 0)
    return 1;
  for (int64_t r = 0; r < rows; ++r) {
    if (positions[r] < 0 || positions[r] >= max_blocks * block_size || slots[r] < 0 || slots[r] >= n_tables) return 2;
    const int64_t* table = block_tables + slots[r] * max_blocks;
    for (int64_t b = 0; b <= positions[r] / block_size; ++b)
      if (table[b] < 0 || table[b] >= n_blocks) return 3;
  }
  return 0;
}

// The new key (after RoPE) and value of one row and KV head into position t of the block (of
// that KV head) at `block`: fp32 a row per position; bf16 in the bf16 layout.
inline void put(const float* k, const float* v, const float* rotation, float* keys, float* values, int64_t block,
                int64_t t, int64_t head_dim) {
  rope(k, rotation, keys + block + t * head_dim, head_dim);
  std::memcpy(values + block + t * head_dim, v, head_dim * sizeof(float));
}

#ifdef ATTENTION_BF16_CACHE
inline void put(const float* k, const float* v, const float* rotation, uint16_t* keys, uint16_t* values,
                int64_t block, int64_t t, int64_t head_dim) {
  alignas(64) float rotated[MAX_HEAD_DIM];
  alignas(64) uint16_t bits[MAX_HEAD_DIM];
  rope(k, rotation, rotated, head_dim);
  llamaserve_round::bf16_row(rotated, head_dim, bits);
  put_key(bits, t, head_dim, keys + block);
  llamaserve_round::bf16_row(v, head_dim, bits);
  put_value(bits, t, head_dim, values + block);
}
#endif

// The query as attend takes it: fp32 after RoPE, or (bf16 cache) rounded to bf16 after RoPE.
inline void query_of(const float* x, const float* rotation, float* query, int64_t head_dim) {
  rope(x, rotation, query, head_dim);
}

inline void query_of(const float* x, const float* rotation, uint16_t* query, int64_t head_dim) {
  alignas(64) float rotated[MAX_HEAD_DIM];
  rope(x, rotation, rotated, head_dim);
  llamaserve_round::bf16_row(rotated, head_dim, query);
}

// See llamaserve_decode_attention below; C is the cache's element: float, or uint16_t (bf16 bits).
template <typename C>
int decode_attention(const float* q, int64_t q_row_stride, int64_t q_head_stride, const float* new_k,
                     const float* new_v, int64_t kv_row_stride, int64_t kv_head_stride, const float* rotation,
                     C* key_cache, C* value_cache, int64_t n_blocks, int64_t block_size, const int64_t* block_tables,
                     int64_t n_tables, int64_t max_blocks, const int64_t* slots, const int64_t* positions, float* out,
                     int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale) {
  if (const int bad = check_rows(block_tables, n_tables, max_blocks, n_blocks, block_size, slots, positions, rows,
                                 heads, kv_heads, head_dim))
    return bad;
#ifdef ATTENTION_BF16_CACHE
  if (!std::is_same_v<C, float> && (head_dim % 32 != 0 || block_size != BF16_BLOCK)) return 4;
#endif
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = block_size * head_dim;
  const int64_t block_stride = kv_heads * head_stride;

  // Every new key and value first, then the attention: rows of one sequence (a prefill chunk)
  // see each other's keys, so no row may attend before all are written. One decode step's rows
  // are too few to share out (the grain keeps them on the calling thread, with no fork).
  at::parallel_for(0, rows * kv_heads, 512, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kvh = task % kv_heads, pos = positions[r];
      const int64_t block = block_tables[slots[r] * max_blocks + pos / block_size] * block_stride + kvh * head_stride;
      put(new_k + r * kv_row_stride + kvh * kv_head_stride, new_v + r * kv_row_stride + kvh * kv_head_stride,
          rotation + r * head_dim, key_cache, value_cache, block, pos % block_size, head_dim);
    }
  });
  // Attention in runs of consecutive rows of one slot (a prefill chunk's; a decode row is a run
  // of its own), as many as one attend call takes with all their query heads of a KV head.
  const int64_t run_cap = std::max<int64_t>(1, MAX_QUERIES / group);
  std::vector<int64_t> run_starts;
  for (int64_t r = 0; r < rows; ++r)
    if (r == 0 || slots[r] != slots[r - 1] || positions[r] != positions[r - 1] + 1 || r - run_starts.back() == run_cap)
      run_starts.push_back(r);
  const int64_t runs = static_cast<int64_t>(run_starts.size());
  run_starts.push_back(rows);
  const int64_t score_stride = (max_blocks * block_size + LANES - 1) / LANES * LANES;
  at::parallel_for(0, runs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread between calls: a fresh buffer of a long context's scores per call and
    // layer costs page faults in every decode step. Written before it is read.
    // (bf16: the softmax weights as bf16 pairs too, half a score row each.)
    thread_local std::vector<C> query;
    thread_local std::vector<float> scores;
    thread_local std::vector<uint32_t> weight_pairs;
    if (query.size() < static_cast<size_t>(MAX_QUERIES * head_dim)) query.resize(MAX_QUERIES * head_dim);
    if (scores.size() < static_cast<size_t>(MAX_QUERIES * score_stride)) scores.resize(MAX_QUERIES * score_stride);
    if (!std::is_same_v<C, float> && weight_pairs.size() < static_cast<size_t>(MAX_QUERIES * score_stride / 2))
      weight_pairs.resize(MAX_QUERIES * score_stride / 2);
    const C* queries[MAX_QUERIES];
    float* outs[MAX_QUERIES];
    int64_t n_keys[MAX_QUERIES];
    for (int64_t task = begin; task < end; ++task) {
      // Head-major task order: a thread's share spans every row's heads, so at one user (one
      // real row, one padding row) both threads read keys from memory, not one of them.
      const int64_t kvh = task / runs, run = task % runs;
      const int64_t first = run_starts[run], last = run_starts[run + 1];
      const int64_t* table = block_tables + slots[first] * max_blocks;
      int64_t n = 0;
      for (int64_t r = first; r < last; ++r)
        for (int64_t j = 0; j < group; ++j) {
          const int64_t h = kvh * group + j;
          query_of(q + r * q_row_stride + h * q_head_stride, rotation + r * head_dim, &query[n * head_dim], head_dim);
          queries[n] = &query[n * head_dim];
          outs[n] = out + (r * heads + h) * head_dim;
          n_keys[n] = positions[r] + 1;
          if (++n == MAX_QUERIES || (r + 1 == last && j + 1 == group)) {
            if constexpr (std::is_same_v<C, float>)
              attend(n, queries, n_keys, key_cache, value_cache, table, block_stride, kvh * head_stride, block_size,
                     head_dim, scale, scores.data(), score_stride, outs);
#ifdef ATTENTION_BF16_CACHE
            else
              attend_bf16(n, queries, n_keys, key_cache, value_cache, table, block_stride, kvh * head_stride, head_dim,
                          scale, scores.data(), score_stride, weight_pairs.data(), outs);
#endif
            n = 0;
          }
        }
    }
  });
  return 0;
}

}  // namespace

extern "C" {

// q [rows, heads, head_dim] and new_k/new_v [rows, kv_heads, head_dim] with the given row and
// head strides (last dim contiguous); rotation [rows, head_dim/2, 2] (cos, sin) contiguous;
// caches [n_blocks, kv_heads, block_size, head_dim] contiguous; block_tables [n_tables,
// max_blocks] contiguous; out [rows, heads, head_dim] contiguous. Row r reads block table
// slots[r]: it writes its new key/value at position positions[r] of that sequence and attends
// to its positions 0..positions[r]. Several rows may belong to one sequence (a prefill chunk:
// consecutive positions); a row is computed alike whether it comes alone (decode, a one-token
// chunk) or among others, so where a prompt is cut into chunks changes no bit. Padding rows
// share the null block and race only on values nobody reads. cache_bf16: the caches hold bf16
// bits in the bf16 layout ("bf16 cache" above: head_dim a multiple of 32, blocks of 16
// positions; 5 where this build has no AVX512-BF16), else fp32.
int llamaserve_decode_attention(
    const float* q, int64_t q_row_stride, int64_t q_head_stride,
    const float* new_k, const float* new_v, int64_t kv_row_stride, int64_t kv_head_stride,
    const float* rotation, void* key_cache, void* value_cache, int64_t cache_bf16, int64_t n_blocks,
    int64_t block_size, const int64_t* block_tables, int64_t n_tables, int64_t max_blocks,
    const int64_t* slots, const int64_t* positions, float* out,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale) {
  if (!cache_bf16)
    return decode_attention(q, q_row_stride, q_head_stride, new_k, new_v, kv_row_stride, kv_head_stride, rotation,
                            static_cast<float*>(key_cache), static_cast<float*>(value_cache), n_blocks, block_size,
                            block_tables, n_tables, max_blocks, slots, positions, out, rows, heads, kv_heads,
                            head_dim, scale);
#ifdef ATTENTION_BF16_CACHE
  return decode_attention(q, q_row_stride, q_head_stride, new_k, new_v, kv_row_stride, kv_head_stride, rotation,
                          static_cast<uint16_t*>(key_cache), static_cast<uint16_t*>(value_cache), n_blocks, block_size,
                          block_tables, n_tables, max_blocks, slots, positions, out, rows, heads, kv_heads, head_dim,
                          scale);
#else
  return 5;
#endif
}

// Whether this build takes a bf16 cache (the CPU has AVX512-BF16).
int llamaserve_decode_attention_bf16_cache() {
#ifdef ATTENTION_BF16_CACHE
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
