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

// scores[t] = scale * (query . key t) for t < n_keys, in tiles of 16 keys; the tail tile
// repeats the last key, and `scores` has room for it. Key t lives in block table[t / block_size]
// (block_stride floats apart, this head's keys `head_offset` into each block); block_size is a
// multiple of 16, so a tile never straddles two blocks, and each key's dot product is the same
// sequence of operations wherever its block sits.
inline void block_scores(const float* query, const float* cache, const int64_t* table, int64_t block_stride,
                         int64_t head_offset, int64_t block_size, int64_t n_keys, int64_t head_dim, float scale,
                         float* scores) {
  for (int64_t t0 = 0; t0 < n_keys; t0 += LANES) {
    const float* tile = cache + table[t0 / block_size] * block_stride + head_offset + (t0 % block_size) * head_dim;
    v16 acc[LANES];
    for (int i = 0; i < LANES; ++i) {
      const float* key = tile + (std::min<int64_t>(t0 + i, n_keys - 1) - t0) * head_dim;
      v16 sum = load(query) * load(key);
      for (int64_t d = LANES; d < head_dim; d += LANES) sum += load(query + d) * load(key + d);
      acc[i] = sum;
    }
    store(scores + t0, transpose_sum(acc) * scale);
  }
}

// Softmax weights in place over scores[0..n_keys) (zeros after, up to the block end) and
// their total, in blocks of 16 summed lane-wise, then across lanes.
inline float softmax_weights(float* scores, int64_t n_keys) {
  float top = scores[0];
  for (int64_t t = 1; t < n_keys; ++t) top = scores[t] > top ? scores[t] : top;
  v16 total{};
  for (int64_t t0 = 0; t0 < n_keys; t0 += LANES) {
    v16 w = exp_nonpositive(load(scores + t0) - top);
    for (int l = 0; l < LANES; ++l)
      if (t0 + l >= n_keys) w[l] = 0.0f;
    store(scores + t0, w);
    total += w;
  }
  return lane_sum(total);
}

}  // namespace

extern "C" {

// q [rows, heads, head_dim] and new_k/new_v [rows, kv_heads, head_dim] with the given row and
// head strides (last dim contiguous); rotation [rows, head_dim/2, 2] (cos, sin) contiguous;
// caches [n_blocks, kv_heads, block_size, head_dim] contiguous; block_tables [n_tables,
// max_blocks] contiguous; out [rows, heads, head_dim] contiguous. Row r reads block table
// slots[r]: it writes its new key/value at position positions[r] of that sequence and attends
// to its positions 0..positions[r]. Rows of distinct sequences never touch the same block; rows
// that share one (padding rows on the null block) race only on values nobody reads.
int llamaserve_decode_attention(
    const float* q, int64_t q_row_stride, int64_t q_head_stride,
    const float* new_k, const float* new_v, int64_t kv_row_stride, int64_t kv_head_stride,
    const float* rotation, float* key_cache, float* value_cache, int64_t n_blocks, int64_t block_size,
    const int64_t* block_tables, int64_t n_tables, int64_t max_blocks,
    const int64_t* slots, const int64_t* positions, float* out,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale) {
  if (rows <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || head_dim % LANES != 0 ||
      head_dim > MAX_HEAD_DIM || block_size <= 0 || block_size % LANES != 0)
    return 1;
  for (int64_t r = 0; r < rows; ++r) {
    if (positions[r] < 0 || positions[r] >= max_blocks * block_size || slots[r] < 0 || slots[r] >= n_tables) return 2;
    const int64_t* table = block_tables + slots[r] * max_blocks;
    for (int64_t b = 0; b <= positions[r] / block_size; ++b)
      if (table[b] < 0 || table[b] >= n_blocks) return 3;
  }
  const int64_t group = heads / kv_heads;
  const int64_t head_stride = block_size * head_dim;
  const int64_t block_stride = kv_heads * head_stride;

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t score_stride = (max_blocks * block_size + LANES - 1) / LANES * LANES;
    std::vector<float> query(group * head_dim), scores(group * score_stride);
    for (int64_t task = begin; task < end; ++task) {
      // Head-major task order: a thread's share spans every row's heads, so at one user (one
      // real row, one padding row) both threads read keys from memory, not one of them.
      const int64_t kvh = task / rows, r = task % rows;
      const int64_t pos = positions[r], n_keys = pos + 1;
      const float* rot = rotation + r * head_dim;
      const int64_t* table = block_tables + slots[r] * max_blocks;
      const int64_t head_offset = kvh * head_stride;
      const int64_t at_pos = table[pos / block_size] * block_stride + head_offset + (pos % block_size) * head_dim;
      rope(new_k + r * kv_row_stride + kvh * kv_head_stride, rot, key_cache + at_pos, head_dim);
      std::memcpy(value_cache + at_pos, new_v + r * kv_row_stride + kvh * kv_head_stride, head_dim * sizeof(float));

      for (int64_t j = 0; j < group; ++j)
        rope(q + r * q_row_stride + (kvh * group + j) * q_head_stride, rot, &query[j * head_dim], head_dim);
      for (int64_t j = 0; j < group; ++j) {
        float* s = &scores[j * score_stride];
        block_scores(&query[j * head_dim], key_cache, table, block_stride, head_offset, block_size, n_keys, head_dim,
                     scale, s);
        const float inv_total = 1.0f / softmax_weights(s, n_keys);
        float* o = out + (r * heads + kvh * group + j) * head_dim;
        // Keys outer, one accumulator per 16 dims: independent chains, each summed in key order.
        v16 acc[MAX_HEAD_DIM / LANES] = {};
        const int64_t blocks = head_dim / LANES;
        for (int64_t k0 = 0; k0 < n_keys; k0 += block_size) {
          const float* block_values = value_cache + table[k0 / block_size] * block_stride + head_offset;
          const int64_t k_end = std::min<int64_t>(k0 + block_size, n_keys);
          for (int64_t k = k0; k < k_end; ++k) {
            const float* v = block_values + (k - k0) * head_dim;
            for (int64_t b = 0; b < blocks; ++b) acc[b] += s[k] * load(v + b * LANES);
          }
        }
        for (int64_t b = 0; b < blocks; ++b) store(o + b * LANES, acc[b] * inv_total);
      }
    }
  });
  return 0;
}

}  // extern "C"
