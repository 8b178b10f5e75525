// Every layer of a decode step in one call: per layer, the packed q/k/v matmul, the decode
// attention kernel, the output matmul, residual add + RMSNorm, the packed w1/w3 matmul, SwiGLU,
// the w2 matmul and residual add + RMSNorm of the next layer's input. Matmuls are oneDNN's, the
// same op on the same packed weights as the Python path (so the same bits); the rest are the
// kernels of decode_attention.cpp and pointwise.cpp, compiled in here.
//
// Why: at one user a step is ~100 small calls between the matmuls, and inside a step each costs
// 16-22 us of Python, since the weight stream evicts the interpreter's data between calls
// (measured; 3-5 us in a microbenchmark). Here they are C++ calls.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "decode_attention.cpp"
#include "pointwise.cpp"
#include "qmatmul.cpp"

namespace {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

void check(int status, const char* what) {
  TORCH_CHECK(status == 0, what, " rejected its arguments (code ", status, ")");
}

// Matmul `index` of the step: oneDNN's on an fp32 weight it packed (one tensor per matmul), or
// qmatmul.cpp's on a bf16/int8/int4 one (three: weights, aux, meta [format, n, k, group]).
at::Tensor linear(const at::Tensor& x, at::TensorList matmuls, int64_t index, int64_t per_matmul) {
  if (per_matmul == 1) return packed_linear(x, matmuls[index]);
  const at::Tensor& meta = matmuls[3 * index + 2];
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.numel() == 4 && x.is_contiguous(), "qmatmul meta");
  const int64_t* m = meta.data_ptr<int64_t>();
  TORCH_CHECK(x.size(1) == m[2], "qmatmul: input width");
  at::Tensor out = at::empty({x.size(0), m[1]}, x.options());
  check(llamaserve_qmatmul(x.data_ptr<float>(), x.size(0), m[2], m[1], m[0], m[3], matmuls[3 * index].data_ptr(),
                           matmuls[3 * index + 1].data_ptr(), out.data_ptr<float>()),
        "qmatmul");
  return out;
}

// h [B, dim] -> the final-normed hidden state [B, dim]. norms: attention norm of every layer,
// then the ffn norm of every layer, then the final norm. matmuls: wqkv, wo, w13, w2 per layer
// (packed). Caches [n_blocks, kv_heads, block_size, hd] per layer (fp32 or bf16), read through block_tables
// [n_tables, max_blocks] int64. rotation [B, hd/2, 2], slots (table rows) and positions [B]
// int64 (DecodeRows).
at::Tensor decode_layers(const at::Tensor& h_in, at::TensorList norms, at::TensorList matmuls,
                         at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_tables,
                         const at::Tensor& rotation,
                         const at::Tensor& slots, const at::Tensor& positions, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, int64_t hidden, double eps) {
  const int64_t n_layers = static_cast<int64_t>(key_caches.size());
  const int64_t per_matmul = n_layers > 0 ? static_cast<int64_t>(matmuls.size()) / (4 * n_layers) : 1;
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * n_layers + 1) && (per_matmul == 1 || per_matmul == 3) &&
                  matmuls.size() == static_cast<size_t>(4 * n_layers * per_matmul),
              "decode_layers: 2 norms + 4 matmuls (1 or 3 tensors each) per layer, and the final norm");
  TORCH_CHECK(h_in.is_contiguous() && h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "h: contiguous fp32 [B, dim]");
  TORCH_CHECK(block_tables.is_contiguous() && block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong,
              "block_tables: contiguous int64 [n_tables, max_blocks]");
  const int64_t rows = h_in.size(0), dim = h_in.size(1);
  const float feps = static_cast<float>(eps);
  const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  at::Tensor h = h_in, normed = at::empty_like(h_in);
  check(llamaserve_add_rms_norm(h.data_ptr<float>(), nullptr, norms[0].data_ptr<float>(), nullptr,
                                normed.data_ptr<float>(), rows, dim, feps), "rms_norm");
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor qkv = linear(normed, matmuls, 4 * l, per_matmul);
    TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == q_width + 2 * kv_width, "qkv width");
    const at::Tensor& keys = key_caches[l];
    const at::Tensor& values = value_caches[l];
    at::Tensor attended = at::empty({rows, q_width}, h_in.options());
    const float* base = qkv.data_ptr<float>();
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    const bool bf16 = keys.scalar_type() == at::kBFloat16;
    TORCH_CHECK(values.scalar_type() == keys.scalar_type(), "key and value caches of one dtype");
    check(llamaserve_decode_attention(base, qkv.size(1), head_dim, base + q_width, base + q_width + kv_width,
                                      qkv.size(1), head_dim, rotation.data_ptr<float>(), keys.data_ptr(),
                                      values.data_ptr(), bf16, keys.size(0), keys.size(2),
                                      block_tables.data_ptr<int64_t>(), block_tables.size(0), block_tables.size(1),
                                      slots.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
                                      attended.data_ptr<float>(), rows, heads, kv_heads, head_dim, scale),
          "decode_attention");
    const at::Tensor out = linear(attended, matmuls, 4 * l + 1, per_matmul);
    at::Tensor h2 = at::empty_like(h_in), normed2 = at::empty_like(h_in);
    check(llamaserve_add_rms_norm(h.data_ptr<float>(), out.data_ptr<float>(), norms[n_layers + l].data_ptr<float>(),
                                  h2.data_ptr<float>(), normed2.data_ptr<float>(), rows, dim, feps), "add_rms_norm");
    const at::Tensor gate_up = linear(normed2, matmuls, 4 * l + 2, per_matmul);
    at::Tensor act = at::empty({rows, hidden}, h_in.options());
    check(llamaserve_silu_mul(gate_up.data_ptr<float>(), act.data_ptr<float>(), rows, hidden), "silu_mul");
    const at::Tensor down = linear(act, matmuls, 4 * l + 3, per_matmul);
    const at::Tensor& next_norm = l + 1 < n_layers ? norms[l + 1] : norms[2 * n_layers];
    at::Tensor h3 = at::empty_like(h_in), normed3 = at::empty_like(h_in);
    check(llamaserve_add_rms_norm(h2.data_ptr<float>(), down.data_ptr<float>(), next_norm.data_ptr<float>(),
                                  h3.data_ptr<float>(), normed3.data_ptr<float>(), rows, dim, feps), "add_rms_norm");
    h = h3;
    normed = normed3;
  }
  return normed;
}

}  // namespace

TORCH_LIBRARY(llamaserve, m) {
  m.def("decode_layers(Tensor h, Tensor[] norms, Tensor[] matmuls, Tensor[] key_caches, Tensor[] value_caches, "
        "Tensor block_tables, Tensor rotation, Tensor slots, Tensor positions, int heads, int kv_heads, int head_dim, int hidden, "
        "float eps) -> Tensor",
        &decode_layers);
}
