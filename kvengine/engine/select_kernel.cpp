// Query-aware block selection for one layer of a decode batch, in one pass (CPU).
//
// For each (sequence, kv-head) cell: score every block of the cell by the upper bound of q . k
// over its keys (Quest: sum_d max(q_d * min_d, q_d * max_d)), combined over the cell's query heads
// as `head_score` says (0 "sum": the heads' bounds summed; 1 "max": each head's bound minus its best
// over the cell's blocks, the largest over heads; 2 "mass": each head's bounds, times `scale`, as a
// softmax over the cell's blocks, those shares summed over heads); keep the sink and recent blocks,
// add the best-scored others up to `k` blocks, and write the slot table of the chosen blocks in
// cache order: what `kvengine::paged_decode` then reads.
// Registered as the torch op `kvengine_select::select_blocks`; kvengine/engine/select_kernel.py
// builds and loads it. kvengine/engine/selection.py states the contract and holds the torch
// reference path.
//
// q            (N, H_q, D)         this step's queries (any float dtype; scored in float32)
// bound_min    (R, D)              per-block key minimum (bound_max: maximum); row = slot / block_size
// slots        (N, H_kv, T) int64  pool slot of each cached token, cache order, blocks aligned
// lens         (N, H_kv) int64     tokens held per cell
// positions    (N, H_kv, T) int64 or None
// returns      new slots (N, H_kv, k * block_size) (zero_slot past each new length), new lens
//              (N, H_kv), new positions (same shape as new slots, or empty), and (2,) int64:
//              blocks read and blocks held, summed over cells.
// head_score   0 sum, 1 max, 2 mass (above); scale: the softmax temperature of "mass" (1/sqrt(D))
// neighbours   each block taken for its score brings its next `neighbours` blocks (same budget k)
//
// Summing over query heads first is exact: max(q_d * lo_d, q_d * hi_d) is q_d * hi_d for
// q_d >= 0 and q_d * lo_d otherwise, so the group's bound is (sum_g q+_gd) . hi + (sum_g q-_gd) . lo.
// Per head, the bound minus the head's best bound is the log of an upper bound on how much of that
// head's largest weight the block can reach (up to the scale): a block that one head alone looks at
// ranks high even when the other heads of its kv-head look elsewhere, which the sum hides. "mass"
// weighs that by how peaked the head is: a head's best block counts for its share of the head's
// (bound-estimated) attention, so a diffuse head's favourite does not outrank a block that a
// peaked head, or several heads, put their weight on.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

struct Args {
  int64_t num_kv_heads, group, head_dim, max_len, block_size, k, sink, recent, zero_slot, bound_rows, out_len;
  int64_t head_score;  // 0 sum, 1 max, 2 mass
  int64_t neighbours;
  float scale;  // "mass": softmax temperature over the bounds
  bool per_head() const { return head_score != 0; }
};

struct Picks {
  std::vector<float> qpos, qneg, scores, head_scores;  // qpos, qneg: (G or 1, D); head_scores: (G, blocks)
  std::vector<int64_t> order;
  std::vector<char> chosen;
};

constexpr int64_t kAhead = 4;  // blocks whose bound rows are prefetched ahead

template <typename scalar_t>
inline void prefetch_row(const scalar_t* lo, const scalar_t* hi, int64_t row, int64_t head_dim) {
  const int64_t bytes = head_dim * static_cast<int64_t>(sizeof(scalar_t));
  const char* l = reinterpret_cast<const char*>(lo + row * head_dim);
  const char* h = reinterpret_cast<const char*>(hi + row * head_dim);
  for (int64_t byte = 0; byte < bytes; byte += 64) {
    __builtin_prefetch(l + byte);
    __builtin_prefetch(h + byte);
  }
}

// Scores of the cell's blocks; blocks whose bounds are not finite (never for a block holding keys)
// score -inf so that they are picked last.
template <typename scalar_t>
void score_blocks(const float* q, const scalar_t* lo, const scalar_t* hi, const int64_t* slots,
                  int64_t num_blocks, const Args& a, Picks& w) {
  const int64_t D = a.head_dim, heads = a.per_head() ? a.group : 1;
  std::fill(w.qpos.begin(), w.qpos.end(), 0.0f);
  std::fill(w.qneg.begin(), w.qneg.end(), 0.0f);
  for (int64_t g = 0; g < a.group; ++g)  // per head: one row per query head; else the group's sums
    for (int64_t d = 0; d < D; ++d) {
      const float x = q[g * D + d];
      const int64_t at = (a.per_head() ? g * D : 0) + d;
      (x >= 0.0f ? w.qpos[at] : w.qneg[at]) += x;
    }
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (j + kAhead < num_blocks) {  // the rows of a cell's blocks are scattered: ask for them ahead of use
      const int64_t ahead = slots[(j + kAhead) * a.block_size] / a.block_size;
      if (ahead >= 0 && ahead < a.bound_rows) prefetch_row(lo, hi, ahead, D);
    }
    const int64_t row = slots[j * a.block_size] / a.block_size;
    TORCH_CHECK(row >= 0 && row < a.bound_rows, "select_blocks: slot ", slots[j * a.block_size],
                " outside the key bounds");
    const scalar_t* h = hi + row * D;
    const scalar_t* l = lo + row * D;
    for (int64_t g = 0; g < heads; ++g) {
      const float* qp = w.qpos.data() + g * D;
      const float* qn = w.qneg.data() + g * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qp[d] * static_cast<float>(h[d]) + qn[d] * static_cast<float>(l[d]);
      w.head_scores[g * num_blocks + j] = std::isfinite(s) ? s : kNone;
    }
  }
  if (!a.per_head()) {
    std::copy(w.head_scores.begin(), w.head_scores.begin() + num_blocks, w.scores.begin());
    return;
  }
  std::fill(w.scores.begin(), w.scores.begin() + num_blocks, kNone);
  for (int64_t g = 0; g < heads; ++g) {
    float* hs = w.head_scores.data() + g * num_blocks;
    float best = kNone;
    for (int64_t j = 0; j < num_blocks; ++j) best = std::max(best, hs[j]);
    if (best == kNone) continue;  // no finite bound for this head
    if (a.head_score == 1) {
      for (int64_t j = 0; j < num_blocks; ++j)
        if (hs[j] != kNone) w.scores[j] = std::max(w.scores[j], hs[j] - best);
      continue;
    }
    float total = 0.0f;  // "mass": this head's softmax over its blocks' bounds, added to each block's score
    for (int64_t j = 0; j < num_blocks; ++j)
      if (hs[j] != kNone) total += (hs[j] = std::exp(a.scale * (hs[j] - best)));
    for (int64_t j = 0; j < num_blocks; ++j)
      if (hs[j] != kNone) w.scores[j] = (w.scores[j] == kNone ? 0.0f : w.scores[j]) + hs[j] / total;
  }
}

// Marks the blocks one cell reads: sinks, recent ones, then the best scores (ties: the earlier block);
// with neighbours, each sink and each scored pick brings its next `neighbours` blocks while the budget lasts.
void pick(int64_t num_blocks, const Args& a, Picks& w) {
  std::fill(w.chosen.begin(), w.chosen.begin() + num_blocks, 0);
  int64_t taken = 0;
  w.order.clear();
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (j < a.sink || j >= num_blocks - a.recent) {
      w.chosen[j] = 1;
      ++taken;
    } else {
      w.order.push_back(j);
    }
  }
  const int64_t more = std::min<int64_t>(std::max<int64_t>(a.k - taken, 0), w.order.size());
  const auto better = [&](int64_t x, int64_t y) { return w.scores[x] > w.scores[y] || (w.scores[x] == w.scores[y] && x < y); };
  if (a.neighbours == 0) {
    std::partial_sort(w.order.begin(), w.order.begin() + more, w.order.end(), better);
    for (int64_t i = 0; i < more; ++i) w.chosen[w.order[i]] = 1;
    return;
  }
  const auto take = [&](int64_t first) {  // `first` and its next `neighbours` blocks, while the budget lasts
    for (int64_t j = first; j <= first + a.neighbours && j < num_blocks && taken < a.k; ++j)
      if (!w.chosen[j]) {
        w.chosen[j] = 1;
        ++taken;
      }
  };
  for (int64_t j = 0; j < std::min(a.sink, num_blocks); ++j) take(j);  // recent blocks have no successor left out
  std::sort(w.order.begin(), w.order.end(), better);  // a pick may add nothing new: the whole order
  for (size_t i = 0; i < w.order.size() && taken < a.k; ++i) take(w.order[i]);
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& slots,
         const at::Tensor& lens, const int64_t* positions, const Args& a, at::Tensor& new_slots,
         at::Tensor& new_lens, int64_t* new_positions, at::Tensor& counts) {
  const int64_t cells = slots.size(0) * a.num_kv_heads;
  const float* qp = q.data_ptr<float>();
  const scalar_t* lop = lo.data_ptr<scalar_t>();
  const scalar_t* hip = hi.data_ptr<scalar_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t* osp = new_slots.data_ptr<int64_t>();
  int64_t* olp = new_lens.data_ptr<int64_t>();
  std::vector<int64_t> read(cells), held(cells);
  const int64_t max_blocks = (a.max_len + a.block_size - 1) / a.block_size;
  // Work per cell is small (blocks x head_dim): threads only for large batches.
  at::parallel_for(0, cells, 64, [&](int64_t begin, int64_t end) {
    const int64_t rows = a.per_head() ? a.group : 1;
    Picks w{std::vector<float>(rows * a.head_dim), std::vector<float>(rows * a.head_dim),
            std::vector<float>(max_blocks), std::vector<float>(rows * max_blocks), {}, std::vector<char>(max_blocks)};
    w.order.reserve(max_blocks);
    for (int64_t cell = begin; cell < end; ++cell) {
      const int64_t len = std::min(lp[cell], a.max_len);
      const int64_t num_blocks = (len + a.block_size - 1) / a.block_size;
      const int64_t* cs = sp + cell * a.max_len;
      score_blocks<scalar_t>(qp + cell * a.group * a.head_dim, lop, hip, cs, num_blocks, a, w);
      pick(num_blocks, a, w);
      int64_t* out = osp + cell * a.out_len;
      int64_t* out_pos = new_positions == nullptr ? nullptr : new_positions + cell * a.out_len;
      const int64_t* pos = positions == nullptr ? nullptr : positions + cell * a.max_len;
      int64_t filled = 0, blocks = 0;
      for (int64_t j = 0; j < num_blocks && blocks < a.k; ++j) {
        if (!w.chosen[j]) continue;
        const int64_t start = j * a.block_size, stop = std::min(len, start + a.block_size);
        std::copy(cs + start, cs + stop, out + filled);
        if (out_pos != nullptr) std::copy(pos + start, pos + stop, out_pos + filled);
        filled += stop - start;
        ++blocks;
      }
      std::fill(out + filled, out + a.out_len, a.zero_slot);
      if (out_pos != nullptr) std::fill(out_pos + filled, out_pos + a.out_len, int64_t{0});
      olp[cell] = filled;
      read[cell] = blocks;
      held[cell] = num_blocks;
    }
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  cp[0] = std::accumulate(read.begin(), read.end(), int64_t{0});
  cp[1] = std::accumulate(held.begin(), held.end(), int64_t{0});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_blocks(
    const at::Tensor& q, const at::Tensor& bound_min, const at::Tensor& bound_max, const at::Tensor& slots,
    const at::Tensor& lens, const c10::optional<at::Tensor>& positions, int64_t block_size, int64_t k,
    int64_t sink_blocks, int64_t recent_blocks, int64_t zero_slot, int64_t head_score, int64_t neighbours,
    double scale) {
  TORCH_CHECK(q.dim() == 3 && slots.dim() == 3 && lens.dim() == 2, "select_blocks: bad ranks");
  TORCH_CHECK(q.size(0) == slots.size(0) && lens.size(0) == slots.size(0) && lens.size(1) == slots.size(1),
              "select_blocks: q, slots and lens disagree on sequences or heads");
  TORCH_CHECK(q.size(1) % slots.size(1) == 0, "select_blocks: query heads not a multiple of kv-heads");
  TORCH_CHECK(bound_min.dim() == 2 && bound_min.sizes() == bound_max.sizes() && bound_min.size(1) == q.size(2),
              "select_blocks: key bounds must be (rows, head_dim) like q");
  TORCH_CHECK(bound_min.scalar_type() == bound_max.scalar_type(), "select_blocks: bounds dtypes differ");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "select_blocks: int64 tables");
  TORCH_CHECK(block_size >= 1 && k >= 1 && sink_blocks >= 0 && recent_blocks >= 1 && neighbours >= 0,
              "select_blocks: block_size, k and recent_blocks must be >= 1, sink_blocks and neighbours >= 0");
  TORCH_CHECK(head_score >= 0 && head_score <= 2, "select_blocks: head_score must be 0 (sum), 1 (max) or 2 (mass)");
  TORCH_CHECK(scale > 0.0, "select_blocks: scale must be > 0");
  if (positions.has_value()) {
    TORCH_CHECK(positions->sizes() == slots.sizes() && positions->scalar_type() == at::kLong,
                "select_blocks: positions must match slots");
  }
  const Args a{slots.size(1), q.size(1) / slots.size(1), q.size(2), slots.size(2), block_size, k,
               sink_blocks, recent_blocks, zero_slot, bound_min.size(0), k * block_size, head_score, neighbours,
               static_cast<float>(scale)};
  const at::Tensor qf = q.to(at::kFloat).contiguous(), sc = slots.contiguous(), lc = lens.contiguous();
  const at::Tensor lo = bound_min.contiguous(), hi = bound_max.contiguous();
  const auto long_opts = slots.options().dtype(at::kLong);
  at::Tensor new_slots = at::empty({slots.size(0), slots.size(1), a.out_len}, long_opts);
  at::Tensor new_lens = at::empty({slots.size(0), slots.size(1)}, long_opts);
  at::Tensor counts = at::empty({2}, long_opts);
  at::Tensor pc, new_positions = at::empty({0}, long_opts);
  if (positions.has_value()) {
    pc = positions->contiguous();
    new_positions = at::empty_like(new_slots);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lo.scalar_type(), "select_blocks", [&] {
    run<scalar_t>(qf, lo, hi, sc, lc, positions.has_value() ? pc.data_ptr<int64_t>() : nullptr, a, new_slots,
                  new_lens, positions.has_value() ? new_positions.data_ptr<int64_t>() : nullptr, counts);
  });
  return {new_slots, new_lens, new_positions, counts};
}

}  // namespace

TORCH_LIBRARY(kvengine_select, m) {
  m.def("select_blocks(Tensor q, Tensor bound_min, Tensor bound_max, Tensor slots, Tensor lens, "
        "Tensor? positions, int block_size, int k, int sink_blocks, int recent_blocks, int zero_slot, "
        "int head_score=0, int neighbours=0, float scale=1.0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvengine_select, CPU, m) { m.impl("select_blocks", &select_blocks); }
