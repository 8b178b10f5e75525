// Decode-step attention for fp32 on CPU: RoPE on the new query/key, the cache write, and
// attention over each row's own visible keys, in one call per layer.
//
// Why a kernel of our own: at one new token per row, scaled_dot_product_attention plus the
// RoPE and cache-write ops cost more in dispatch and blocking than the arithmetic they do
// (measured: 13-17 ms of a 100 ms step at 32 users on the benchmark model). Every (row,
// kv-head) task here is computed by one thread with a fixed summation order, from its own
// row's data only, so a row's result has the same bits whatever the batch size, the other
// rows, the thread count or the key length of its neighbours: the batch invariance the engine
// promises holds by construction.

#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Softmax weights in place over scores[0..n_keys) (zeros after, up to the block end) and
// their total, in blocks of 16 summed lane-wise, then across lanes.
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
    const v16 w = exp_nonpositive(load(scores + t0) - top);
    store(scores + t0, w);
    total += w;
  }
  if (whole < n_keys) {
    v16 w = exp_nonpositive(load(scores + whole) - top);
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
  for (int64_t j = 0; j < n; ++j) inv_total[j] = 1.0f / softmax_weights(scores + j * score_stride, n_keys[j]);
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
// share the null block and race only on values nobody reads.
int llamaserve_decode_attention(
    const float* q, int64_t q_row_stride, int64_t q_head_stride,
    const float* new_k, const float* new_v, int64_t kv_row_stride, int64_t kv_head_stride,
    const float* rotation, float* key_cache, float* value_cache, int64_t n_blocks, int64_t block_size,
    const int64_t* block_tables, int64_t n_tables, int64_t max_blocks,
    const int64_t* slots, const int64_t* positions, float* out,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale) {
  if (const int bad = check_rows(block_tables, n_tables, max_blocks, n_blocks, block_size, slots, positions, rows,
                                 heads, kv_heads, head_dim))
    return bad;
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = block_size * head_dim;
  const int64_t block_stride = kv_heads * head_stride;

  // Every new key and value first, then the attention: rows of one sequence (a prefill chunk)
  // see each other's keys, so no row may attend before all are written. One decode step's rows
  // are too few to share out (the grain keeps them on the calling thread, with no fork).
  at::parallel_for(0, rows * kv_heads, 512, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kvh = task % kv_heads, pos = positions[r];
      const int64_t at_pos = block_tables[slots[r] * max_blocks + pos / block_size] * block_stride +
                             kvh * head_stride + (pos % block_size) * head_dim;
      rope(new_k + r * kv_row_stride + kvh * kv_head_stride, rotation + r * head_dim, key_cache + at_pos, head_dim);
      std::memcpy(value_cache + at_pos, new_v + r * kv_row_stride + kvh * kv_head_stride, head_dim * sizeof(float));
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
    thread_local std::vector<float> query, scores;
    if (query.size() < static_cast<size_t>(MAX_QUERIES * head_dim)) query.resize(MAX_QUERIES * head_dim);
    if (scores.size() < static_cast<size_t>(MAX_QUERIES * score_stride)) scores.resize(MAX_QUERIES * score_stride);
    const float* queries[MAX_QUERIES];
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
          rope(q + r * q_row_stride + h * q_head_stride, rotation + r * head_dim, &query[n * head_dim], head_dim);
          queries[n] = &query[n * head_dim];
          outs[n] = out + (r * heads + h) * head_dim;
          n_keys[n] = positions[r] + 1;
          if (++n == MAX_QUERIES || (r + 1 == last && j + 1 == group)) {
            attend(n, queries, n_keys, key_cache, value_cache, table, block_stride, kvh * head_stride, block_size,
                   head_dim, scale, scores.data(), score_stride, outs);
            n = 0;
          }
        }
    }
  });
  return 0;
}

}  // extern "C"
