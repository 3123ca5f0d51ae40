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
// returns    (N, H_q, D)        in q's dtype; float32 arithmetic, value sums folded in float64
//
// The query of a cell is its last cached token (decode appends before
// attending). Query heads h * G .. h * G + G - 1 share kv-head h (G = H_q / H_kv),
// so each key and value row is read once for the whole group. With fewer cells than twice the
// threads (batch 1: as many cells as kv-heads), each cell's tokens are split into ranges attended
// on different threads and merged by their top scores, so that no thread waits on another's cell.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

struct Shape {
  int64_t num_kv_heads, group, head_dim, max_len, pool_rows;
};

// exp(x) for x <= 0 in plain arithmetic, so that loops over it vectorize (std::exp does not
// without -ffast-math): Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp in
// float32 for x in [-87, 0]. Below that (masked scores are -inf) it returns exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : y * scale;
}

// Ask for row `slot` of `pool` ahead of use: the rows of a cache are scattered over blocks, so
// the hardware prefetcher alone leaves the loop waiting on memory.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* pool, int64_t slot, int64_t head_dim) {
  const char* row = reinterpret_cast<const char*>(pool + slot * head_dim);
  for (int64_t byte = 0; byte < head_dim * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
    __builtin_prefetch(row + byte);
}

constexpr int64_t kAhead = 8;  // rows prefetched ahead

struct Scratch {
  std::vector<float> q, scores, chunk;  // scaled queries (G, D), scores (G, T), a chunk's sums (G, D)
  std::vector<double> acc;              // weighted sums of values (G, D)
  explicit Scratch(const Shape& s)
      : q(s.group * s.head_dim), scores(s.group * s.max_len), chunk(s.group * s.head_dim), acc(s.group * s.head_dim) {}
};

constexpr int64_t kChunk = 64;  // values summed in float32 this many at a time, chunks in float64
constexpr int64_t kMinPart = 256;  // fewest tokens per range when a cell's tokens are split over threads

// What one range of a cell's tokens gives: per query head, value sums weighted by
// exp(score - top) (in w.acc), its top score and the weights' total.
struct Part {
  float top[64];
  double total[64];
};

// Attention of a cell's query heads over its tokens [begin, end), unnormalized: the weighted value
// sums go to w.acc, each head's top score and total weight to `part`. `len` is the cell's length
// (its last token is the query, for the window).
template <typename scalar_t>
void attend_range(const scalar_t* q, const scalar_t* k_pool, const scalar_t* v_pool, const int64_t* slots,
                  const int64_t* positions, int64_t len, int64_t begin, int64_t end, int64_t window, float scale,
                  const Shape& s, Scratch& w, Part& part) {
  const int64_t D = s.head_dim, G = s.group, T = s.max_len;
  for (int64_t i = 0; i < G * D; ++i) w.q[i] = static_cast<float>(q[i]) * scale;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t cutoff = (positions != nullptr && window > 0 && len > 0) ? positions[len - 1] - window
                                                                          : std::numeric_limits<int64_t>::min();
  for (int64_t t = begin; t < end; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < s.pool_rows, "paged_decode: slot ", slots[t], " outside the pool");
  }
  // Scores, four keys at a time: four independent sums per query keep the FMA units busy.
  int64_t t = begin;
  for (; t + 4 <= end; t += 4) {
    for (int64_t a = t + kAhead; a < std::min(end, t + kAhead + 4); ++a) prefetch_row(k_pool, slots[a], D);
    const scalar_t* k0 = k_pool + slots[t] * D;
    const scalar_t* k1 = k_pool + slots[t + 1] * D;
    const scalar_t* k2 = k_pool + slots[t + 2] * D;
    const scalar_t* k3 = k_pool + slots[t + 3] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = w.q.data() + g * D;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) {
        s0 += qg[d] * static_cast<float>(k0[d]);
        s1 += qg[d] * static_cast<float>(k1[d]);
        s2 += qg[d] * static_cast<float>(k2[d]);
        s3 += qg[d] * static_cast<float>(k3[d]);
      }
      float* sg = w.scores.data() + g * T + t;
      sg[0] = s0, sg[1] = s1, sg[2] = s2, sg[3] = s3;
    }
  }
  for (; t < end; ++t) {
    const scalar_t* key = k_pool + slots[t] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = w.q.data() + g * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(key[d]);
      w.scores[g * T + t] = dot;
    }
  }
  if (positions != nullptr) {  // keys outside the window: weight 0
    for (int64_t u = begin; u < end; ++u)
      if (positions[u] <= cutoff)
        for (int64_t g = 0; g < G; ++g) w.scores[g * T + u] = neg_inf;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = w.scores.data() + g * T;
    float top = neg_inf;
    for (int64_t t = begin; t < end; ++t) top = std::max(top, sg[t]);
    part.top[g] = top;
    if (top == neg_inf) top = 0.0f;  // nothing seen here: all weights 0
#pragma omp simd
    for (int64_t t = begin; t < end; ++t) {
      // Weights under e^-40 of the largest are dropped (0): they cannot move a float32 sum,
      // and their products would be subnormal numbers, which x86 computes very slowly.
      const float x = sg[t] - top;
      sg[t] = x < -40.0f ? 0.0f : exp_nonpositive(x);
    }
    double total = 0.0;  // thousands of terms: summed in float64
#pragma omp simd reduction(+ : total)
    for (int64_t t = begin; t < end; ++t) total += sg[t];
    part.total[g] = total;
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.0);
  for (int64_t start = begin; start < end; start += kChunk) {
    std::fill(w.chunk.begin(), w.chunk.end(), 0.0f);
    const int64_t stop = std::min(end, start + kChunk);
    int64_t u = start;
    for (; u + 2 <= stop; u += 2) {  // two values per pass: half the loads and stores of the sums
      for (int64_t a = u + kAhead; a < std::min(end, u + kAhead + 2); ++a) prefetch_row(v_pool, slots[a], D);
      const scalar_t* v0 = v_pool + slots[u] * D;
      const scalar_t* v1 = v_pool + slots[u + 1] * D;
      for (int64_t g = 0; g < G; ++g) {
        const float p0 = w.scores[g * T + u], p1 = w.scores[g * T + u + 1];
        float* cg = w.chunk.data() + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) cg[d] += p0 * static_cast<float>(v0[d]) + p1 * static_cast<float>(v1[d]);
      }
    }
    for (; u < stop; ++u) {
      const scalar_t* value = v_pool + slots[u] * D;
      for (int64_t g = 0; g < G; ++g) {
        const float p = w.scores[g * T + u];
        float* cg = w.chunk.data() + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) cg[d] += p * static_cast<float>(value[d]);
      }
    }
    for (int64_t i = 0; i < G * D; ++i) w.acc[i] += w.chunk[i];
  }
}

// A cell in one range: the sums divided by the total, into `out` (G, D).
template <typename scalar_t>
void attend_cell(const scalar_t* q, const scalar_t* k_pool, const scalar_t* v_pool, const int64_t* slots,
                 const int64_t* positions, int64_t len, int64_t window, float scale, const Shape& s, Scratch& w,
                 scalar_t* out) {
  Part part;
  attend_range(q, k_pool, v_pool, slots, positions, len, 0, len, window, scale, s, w, part);
  const int64_t D = s.head_dim;
  for (int64_t g = 0; g < s.group; ++g) {
    const float inv = part.total[g] > 0.0 ? static_cast<float>(1.0 / part.total[g]) : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<scalar_t>(static_cast<float>(w.acc[g * D + d]) * inv);
  }
}

// Few cells and long caches (batch 1): each cell's tokens in `parts` ranges, so that every
// thread has work; the ranges' sums are merged with their top scores (flash-decoding's split).
template <typename scalar_t>
void attend_split(const scalar_t* qp, const scalar_t* kp, const scalar_t* vp, const int64_t* sp, const int64_t* pp,
                  const int64_t* lp, int64_t cells, int64_t parts, int64_t window, float scale, const Shape& s,
                  scalar_t* op) {
  const int64_t GD = s.group * s.head_dim;
  std::vector<double> acc(cells * parts * GD);
  std::vector<Part> found(cells * parts);
  at::parallel_for(0, cells * parts, 1, [&](int64_t first, int64_t last) {
    Scratch scratch(s);
    for (int64_t task = first; task < last; ++task) {
      const int64_t cell = task / parts, p = task % parts, len = lp[cell];
      attend_range<scalar_t>(qp + cell * GD, kp, vp, sp + cell * s.max_len, pp == nullptr ? nullptr : pp + cell * s.max_len,
                             len, len * p / parts, len * (p + 1) / parts, window, scale, s, scratch, found[task]);
      std::copy(scratch.acc.begin(), scratch.acc.end(), acc.begin() + task * GD);
    }
  });
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t cell = 0; cell < cells; ++cell) {
    for (int64_t g = 0; g < s.group; ++g) {
      float top = neg_inf;
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, found[cell * parts + p].top[g]);
      double total = 0.0;
      std::vector<double> sum(s.head_dim, 0.0);
      for (int64_t p = 0; p < parts; ++p) {
        const Part& part = found[cell * parts + p];
        if (part.top[g] == neg_inf || part.total[g] == 0.0) continue;
        const double f = std::exp(static_cast<double>(part.top[g]) - static_cast<double>(top));
        total += f * part.total[g];
        const double* a = acc.data() + (cell * parts + p) * GD + g * s.head_dim;
        for (int64_t d = 0; d < s.head_dim; ++d) sum[d] += f * a[d];
      }
      const double inv = total > 0.0 ? 1.0 / total : 0.0;
      for (int64_t d = 0; d < s.head_dim; ++d) op[cell * GD + g * s.head_dim + d] = static_cast<scalar_t>(sum[d] * inv);
    }
  }
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
  // Fewer cells than twice the threads, on caches long enough to share: split them (kMinPart tokens
  // or more per range).
  const int64_t threads = at::get_num_threads();
  const int64_t parts = cells >= 2 * threads ? 1 : std::min((2 * threads + cells - 1) / cells, s.max_len / kMinPart);
  if (parts > 1) {
    attend_split<scalar_t>(qp, kp, vp, sp, pp, lp, cells, parts, window, fscale, s, op);
    return;
  }
  at::parallel_for(0, cells, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(s);
    for (int64_t cell = begin; cell < end; ++cell) {
      // Cell (n, h): its query heads are rows h * G .. of sequence n, contiguous in q and out.
      const int64_t offset = cell * s.group * s.head_dim;
      attend_cell<scalar_t>(qp + offset, kp, vp, sp + cell * s.max_len,
                            pp == nullptr ? nullptr : pp + cell * s.max_len, lp[cell], window, fscale, s, scratch,
                            op + offset);
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
  TORCH_CHECK(q.size(1) / slots.size(1) <= 64, "paged_decode: at most 64 query heads per kv-head");
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
