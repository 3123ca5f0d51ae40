// A whole decode step of a Llama-family model in one call (CPU).
//
// At batch 1 a decode step of a small model is a few hundred tiny operations:
// per layer two RMSNorms, seven linear layers, RoPE, a cache write, attention,
// SiLU and two residual adds. Through transformers' modules each costs tens
// of microseconds of Python and dispatch, which on a 135M-parameter model is
// as long as reading the weights. This op runs every decoder layer in C++:
// the linear layers through kvengine's own ops (`kvengine::small_linear*`,
// small_linear.cpp), attention through `kvengine::paged_decode`
// (paged_decode.cpp) over the pool's blocks in place, and the small
// element-wise work inline. kvengine/engine/fused.py decides when a step may
// take it and builds its arguments; kernel.py builds and loads this file.
//
// Rounding follows transformers at the model's dtype: every intermediate
// that the eager model holds in bfloat16 / float16 is rounded to it here at
// the same point (products and sums in float32 in between), so bf16 greedy
// tokens match the eager model's as closely as fp32 ones do.
//
// hidden   (N, E) the step's input embeddings, one row per decoding sequence, model dtype
// norms    2L + 1 RMSNorm weights (E,): input and post-attention norm per layer, then the final norm
// qk_norms none, or 2L RMSNorm weights (D,): each layer's q_norm and k_norm over every head (Qwen3)
// linears  7L linear layers as 4 tensors each (weight, scales, mins, bias; an empty tensor where
//          there is none) in the order q, k, v, o, gate, up, down; `kinds` 7L: 0 plain, 1 int8, 2 int4
// cos, sin (N, D) the rotary embedding of each row's position, model dtype
// k_pool, v_pool (S, D) the block pool, model dtype
// new_slots (L, H_kv, N) where each row's new key / value goes
// slots    (L, N, H_kv, T), lens (L, N, H_kv): each cell's cached slots (this step's included)
// max_rows plain (unquantized) weights go through kvengine::small_linear up to this many rows
// returns  (N, E) the final norm's output (the lm_head's input)

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using OptTensor = c10::optional<at::Tensor>;

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)> plain;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)> q8;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const OptTensor&)>
      q4;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const OptTensor&, int64_t, double)>
      attend;
};

// The ops this one calls, found once (their libraries are loaded before this one).
const Ops& ops() {
  static const Ops found = [] {
    auto& d = c10::Dispatcher::singleton();
    return Ops{
        d.findSchemaOrThrow("kvengine::small_linear", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(),
        d.findSchemaOrThrow("kvengine::small_linear_q8", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>(),
        d.findSchemaOrThrow("kvengine::small_linear_q4", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const OptTensor&)>(),
        d.findSchemaOrThrow("kvengine::paged_decode", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const OptTensor&, int64_t, double)>(),
    };
  }();
  return found;
}

// One linear layer of `linears` (index i of 7L) applied to x (N, K).
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& linears, const std::vector<int64_t>& kinds,
                  int64_t max_rows, int64_t i) {
  const at::Tensor& w = linears[4 * i];
  const at::Tensor& bias = linears[4 * i + 3];
  const OptTensor b = bias.numel() > 0 ? OptTensor(bias) : c10::nullopt;
  switch (kinds[i]) {
    case 1: return ops().q8.call(x, w, linears[4 * i + 1], b);
    case 2: return ops().q4.call(x, w, linears[4 * i + 1], linears[4 * i + 2], b);
    default:
      // Past a few rows the product is no longer bound by the weight's bytes: ATen's GEMM wins.
      return x.size(0) <= max_rows ? ops().plain.call(x, w, b) : at::linear(x, w, b);
  }
}

template <typename T>
inline T rnd(float v) {
  return static_cast<T>(v);
}

// out = w * (x / rms(x)) per row, as transformers' RMSNorm: float32 inside, rounded twice.
template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    float sq = 0.0f;
    for (int64_t i = 0; i < width; ++i) sq += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(width) + eps);
    for (int64_t i = 0; i < width; ++i) {
      out[r * width + i] = rnd<T>(static_cast<float>(w[i]) * static_cast<float>(rnd<T>(static_cast<float>(xr[i]) * inv)));
    }
  }
}

// RoPE in place on `heads` heads of each row: x * cos + rotate_half(x) * sin.
template <typename T>
void rope(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<float> tmp(dim);
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * dim;
    const T* s = sin + r * dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (r * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const float rot = d < half ? -static_cast<float>(v[d + half]) : static_cast<float>(v[d - half]);
        const float a = static_cast<float>(rnd<T>(static_cast<float>(v[d]) * static_cast<float>(c[d])));
        const float b = static_cast<float>(rnd<T>(rot * static_cast<float>(s[d])));
        tmp[d] = static_cast<float>(rnd<T>(a + b));
      }
      for (int64_t d = 0; d < dim; ++d) v[d] = static_cast<T>(tmp[d]);
    }
  }
}

// The new keys / values (N, H_kv, D) into the pool at new_slots (H_kv, N).
template <typename T>
void write_pool(const T* k, const T* v, T* k_pool, T* v_pool, const int64_t* new_slots, int64_t rows,
                int64_t heads, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t slot = new_slots[h * rows + r];
      std::copy_n(k + (r * heads + h) * dim, dim, k_pool + slot * dim);
      std::copy_n(v + (r * heads + h) * dim, dim, v_pool + slot * dim);
    }
  }
}

template <typename T>
void add_into(T* h, const T* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = rnd<T>(static_cast<float>(h[i]) + static_cast<float>(o[i]));
}

// silu(gate) * up into gate, rounded as the eager model rounds each of the two.
template <typename T>
void silu_mul(T* gate, const T* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float act = static_cast<float>(rnd<T>(g / (1.0f + std::exp(-g))));
    gate[i] = rnd<T>(act * static_cast<float>(up[i]));
  }
}

struct Shape {
  int64_t rows, width, heads, kv_heads, dim, layers;
  int64_t max_rows;  // plain weights take kvengine::small_linear up to this many rows, at::linear past it
};

template <typename T>
at::Tensor run(at::Tensor h, const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& qk_norms,
               const std::vector<at::Tensor>& linears,
               const std::vector<int64_t>& kinds, const at::Tensor& cos, const at::Tensor& sin,
               const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& new_slots,
               const at::Tensor& slots, const at::Tensor& lens, const Shape& s, float eps, double scale) {
  at::Tensor normed = at::empty_like(h);
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  for (int64_t l = 0; l < s.layers; ++l) {
    const int64_t li = 7 * l;
    rms_norm(h.data_ptr<T>(), norms[2 * l].data_ptr<T>(), normed.data_ptr<T>(), s.rows, s.width, eps);
    at::Tensor q = linear(normed, linears, kinds, s.max_rows, li).contiguous();
    at::Tensor k = linear(normed, linears, kinds, s.max_rows, li + 1).contiguous();
    at::Tensor v = linear(normed, linears, kinds, s.max_rows, li + 2).contiguous();
    if (!qk_norms.empty()) {  // Qwen3: an RMSNorm over each head's channels before RoPE
      rms_norm(q.data_ptr<T>(), qk_norms[2 * l].data_ptr<T>(), q.data_ptr<T>(), s.rows * s.heads, s.dim, eps);
      rms_norm(k.data_ptr<T>(), qk_norms[2 * l + 1].data_ptr<T>(), k.data_ptr<T>(), s.rows * s.kv_heads, s.dim, eps);
    }
    rope(q.data_ptr<T>(), cp, sp, s.rows, s.heads, s.dim);
    rope(k.data_ptr<T>(), cp, sp, s.rows, s.kv_heads, s.dim);
    write_pool(k.data_ptr<T>(), v.data_ptr<T>(), k_pool.data_ptr<T>(), v_pool.data_ptr<T>(),
               new_slots[l].data_ptr<int64_t>(), s.rows, s.kv_heads, s.dim);
    const at::Tensor attn =
        ops().attend.call(q.view({s.rows, s.heads, s.dim}), k_pool, v_pool, slots[l], lens[l], c10::nullopt, 0, scale);
    const at::Tensor o = linear(attn.view({s.rows, s.heads * s.dim}), linears, kinds, s.max_rows, li + 3).contiguous();
    add_into(h.data_ptr<T>(), o.data_ptr<T>(), h.numel());
    rms_norm(h.data_ptr<T>(), norms[2 * l + 1].data_ptr<T>(), normed.data_ptr<T>(), s.rows, s.width, eps);
    at::Tensor gate = linear(normed, linears, kinds, s.max_rows, li + 4).contiguous();
    const at::Tensor up = linear(normed, linears, kinds, s.max_rows, li + 5).contiguous();
    silu_mul(gate.data_ptr<T>(), up.data_ptr<T>(), gate.numel());
    const at::Tensor down = linear(gate, linears, kinds, s.max_rows, li + 6).contiguous();
    add_into(h.data_ptr<T>(), down.data_ptr<T>(), h.numel());
  }
  rms_norm(h.data_ptr<T>(), norms[2 * s.layers].data_ptr<T>(), normed.data_ptr<T>(), s.rows, s.width, eps);
  return normed;
}

void check_args(const at::Tensor& hidden, const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& linears,
                const std::vector<int64_t>& kinds, const at::Tensor& cos, const at::Tensor& k_pool,
                const at::Tensor& new_slots, const at::Tensor& slots, const at::Tensor& lens, const Shape& s) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.device().is_cpu(), "fused_decode: hidden must be a (N, E) CPU tensor");
  TORCH_CHECK(s.layers > 0 && static_cast<int64_t>(norms.size()) == 2 * s.layers + 1,
              "fused_decode: expected 2L + 1 norm weights");
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == 28 * s.layers && static_cast<int64_t>(kinds.size()) == 7 * s.layers,
              "fused_decode: expected 7 linear layers (4 tensors each) per layer");
  for (const at::Tensor& n : norms) {
    TORCH_CHECK(n.scalar_type() == hidden.scalar_type() && n.is_contiguous() && n.numel() == s.width,
                "fused_decode: norm weights must be contiguous (E,) in the model's dtype");
  }
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({s.rows, s.dim}) && cos.scalar_type() == hidden.scalar_type(),
              "fused_decode: cos / sin must be (N, D) in the model's dtype");
  TORCH_CHECK(k_pool.scalar_type() == hidden.scalar_type() && k_pool.size(1) == s.dim && k_pool.is_contiguous(),
              "fused_decode: the pool must be contiguous (S, D) in the model's dtype");
  TORCH_CHECK(new_slots.dim() == 3 && new_slots.size(0) == s.layers && new_slots.size(1) == s.kv_heads &&
                  new_slots.size(2) == s.rows && new_slots.scalar_type() == at::kLong,
              "fused_decode: new_slots must be int64 (L, H_kv, N)");
  TORCH_CHECK(slots.dim() == 4 && slots.size(0) == s.layers && slots.size(1) == s.rows && slots.size(2) == s.kv_heads,
              "fused_decode: slots must be (L, N, H_kv, T)");
  TORCH_CHECK(lens.dim() == 3 && lens.size(0) == s.layers, "fused_decode: lens must be (L, N, H_kv)");
}

at::Tensor fused_decode(const at::Tensor& hidden, at::TensorList norms, at::TensorList qk_norms, at::TensorList linears,
                        at::IntArrayRef kinds,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
                        const at::Tensor& v_pool, const at::Tensor& new_slots, const at::Tensor& slots,
                        const at::Tensor& lens, int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                        int64_t max_rows) {
  const Shape s{hidden.size(0), hidden.size(1), num_heads, num_kv_heads, k_pool.size(1),
                static_cast<int64_t>(kinds.size()) / 7, max_rows};
  const std::vector<at::Tensor> norm_list(norms.begin(), norms.end());
  const std::vector<at::Tensor> qk_list(qk_norms.begin(), qk_norms.end());
  TORCH_CHECK(qk_list.empty() || static_cast<int64_t>(qk_list.size()) == 2 * s.layers,
              "fused_decode: qk_norms must be empty or 2L weights (q_norm, k_norm per layer)");
  for (const at::Tensor& n : qk_list) {
    TORCH_CHECK(n.scalar_type() == hidden.scalar_type() && n.is_contiguous() && n.numel() == s.dim,
                "fused_decode: q_norm / k_norm weights must be contiguous (D,) in the model's dtype");
  }
  const std::vector<at::Tensor> linear_list(linears.begin(), linears.end());
  const std::vector<int64_t> kind_list(kinds.begin(), kinds.end());
  check_args(hidden, norm_list, linear_list, kind_list, cos, k_pool, new_slots, slots, lens, s);
  at::Tensor h = hidden.contiguous().clone();
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous();
  const at::Tensor ns = new_slots.contiguous(), sl = slots.contiguous(), le = lens.contiguous();
  const float e = static_cast<float>(eps);
  switch (hidden.scalar_type()) {
    case at::kFloat: return run<float>(h, norm_list, qk_list, linear_list, kind_list, c, sn, k_pool, v_pool, ns, sl, le, s, e, scale);
    case at::kBFloat16:
      return run<c10::BFloat16>(h, norm_list, qk_list, linear_list, kind_list, c, sn, k_pool, v_pool, ns, sl, le, s, e, scale);
    case at::kHalf: return run<c10::Half>(h, norm_list, qk_list, linear_list, kind_list, c, sn, k_pool, v_pool, ns, sl, le, s, e, scale);
    default: TORCH_CHECK(false, "fused_decode: the model must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(kvengine_fused, m) {
  m.def("fused_decode(Tensor hidden, Tensor[] norms, Tensor[] qk_norms, Tensor[] linears, int[] kinds, Tensor cos, Tensor sin, "
        "Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor new_slots, Tensor slots, Tensor lens, int num_heads, "
        "int num_kv_heads, float eps, float scale, int max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvengine_fused, CPU, m) { m.impl("fused_decode", &fused_decode); }
