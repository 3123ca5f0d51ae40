// Decode attention read in place from kvengine's block pool (CPU).
//
// One query token per sequence attends over its cached keys and values where
// they lie in the pool: the kernel follows each (sequence, kv-head) cell's
// slot table, so no copy of the context is made. Registered as the torch op
// `kvengine::paged_decode`; kvengine/engine/kernel.py builds and loads it.
//
// q          (N, H_q, D)        this step's queries, one per sequence
// k_pool     (S, D)             the pool's keys (v_pool: values), any slot
// slots      (N, H_kv, T) int64 pool slot of each cached token, cache order
// lens       (N, H_kv) int64    tokens held per cell; entries past it are ignored
// positions  (N, H_kv, T) int64 or None: token positions, for a sliding window
// window     keys at positions <= (query position - window) are not seen; 0: none
// returns    (N, H_q, D)        in q's dtype; scores in float32, the softmax's sums in float64
//
// The query of a cell is its last cached token (decode appends before
// attending). Query heads h * G .. h * G + G - 1 share kv-head h (G = H_q / H_kv),
// so each key and value row is read once for the whole group.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Shape {
  int64_t num_kv_heads, group, head_dim, max_len, pool_rows;
};

template <typename scalar_t>
void attend_cell(const scalar_t* q, const scalar_t* k_pool, const scalar_t* v_pool, const int64_t* slots,
                 const int64_t* positions, int64_t len, int64_t window, float scale, const Shape& s,
                 std::vector<float>& qf, std::vector<float>& scores, std::vector<double>& acc, scalar_t* out) {
  const int64_t D = s.head_dim, G = s.group, T = s.max_len;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  std::fill(acc.begin(), acc.end(), 0.0);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t cutoff = (positions != nullptr && window > 0 && len > 0) ? positions[len - 1] - window
                                                                          : std::numeric_limits<int64_t>::min();
  std::vector<float> row_max(G, neg_inf);
  for (int64_t t = 0; t < len; ++t) {
    if (positions != nullptr && positions[t] <= cutoff) {
      for (int64_t g = 0; g < G; ++g) scores[g * T + t] = neg_inf;
      continue;
    }
    TORCH_CHECK(slots[t] >= 0 && slots[t] < s.pool_rows, "paged_decode: slot ", slots[t], " outside the pool");
    const scalar_t* key = k_pool + slots[t] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(key[d]);
      scores[g * T + t] = dot;
      row_max[g] = std::max(row_max[g], dot);
    }
  }
  std::vector<double> inv_sum(G, 0.0);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * T;
    double total = 0.0;
    for (int64_t t = 0; t < len; ++t) {
      sg[t] = row_max[g] == neg_inf ? 0.0f : std::exp(sg[t] - row_max[g]);
      total += sg[t];
    }
    inv_sum[g] = total > 0.0 ? 1.0 / total : 0.0;
  }
  for (int64_t t = 0; t < len; ++t) {
    const scalar_t* value = v_pool + slots[t] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * T + t];
      if (p == 0.0f) continue;
      double* ag = acc.data() + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += static_cast<double>(p) * static_cast<double>(value[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<scalar_t>(static_cast<float>(acc[g * D + d] * inv_sum[g]));
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& slots,
         const at::Tensor& lens, const c10::optional<at::Tensor>& positions, int64_t window, double scale,
         at::Tensor& out) {
  const Shape s{slots.size(1), q.size(1) / slots.size(1), q.size(2), slots.size(2), k_pool.size(0)};
  const int64_t cells = slots.size(0) * s.num_kv_heads;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_pool.data_ptr<scalar_t>();
  const scalar_t* vp = v_pool.data_ptr<scalar_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* pp = positions.has_value() ? positions->data_ptr<int64_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, cells, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(s.group * s.head_dim), scores(s.group * s.max_len);
    std::vector<double> acc(s.group * s.head_dim);  // weighted sums of thousands of values: float64
    for (int64_t cell = begin; cell < end; ++cell) {
      // Cell (n, h): its query heads are rows h * G .. of sequence n, contiguous in q and out.
      const int64_t offset = cell * s.group * s.head_dim;
      attend_cell<scalar_t>(qp + offset, kp, vp, sp + cell * s.max_len,
                            pp == nullptr ? nullptr : pp + cell * s.max_len, lp[cell], window, fscale, s, qf,
                            scores, acc, op + offset);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slots, const at::Tensor& lens, const c10::optional<at::Tensor>& positions,
                        int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && slots.dim() == 3 && lens.dim() == 2, "paged_decode: bad ranks");
  TORCH_CHECK(q.size(0) == slots.size(0) && lens.size(0) == slots.size(0) && lens.size(1) == slots.size(1),
              "paged_decode: q, slots and lens disagree on sequences or heads");
  TORCH_CHECK(q.size(1) % slots.size(1) == 0, "paged_decode: query heads not a multiple of kv-heads");
  TORCH_CHECK(k_pool.size(1) == q.size(2) && v_pool.sizes() == k_pool.sizes(), "paged_decode: head dims differ");
  TORCH_CHECK(k_pool.scalar_type() == q.scalar_type() && v_pool.scalar_type() == q.scalar_type(),
              "paged_decode: q and the pool must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "paged_decode: int64 tables");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode: the pool must be contiguous");
  if (positions.has_value()) {
    TORCH_CHECK(positions->sizes() == slots.sizes() && positions->scalar_type() == at::kLong,
                "paged_decode: positions must match slots");
  }
  const at::Tensor qc = q.contiguous(), sc = slots.contiguous(), lc = lens.contiguous();
  c10::optional<at::Tensor> pc;
  if (positions.has_value()) pc = positions->contiguous();
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    run<scalar_t>(qc, k_pool, v_pool, sc, lc, pc, window, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvengine, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor lens, Tensor? positions, "
        "int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvengine, CPU, m) { m.impl("paged_decode", &paged_decode); }
