// Linear layers for a few rows at a time, reading the weight once (CPU).
//
// A decode step multiplies every weight matrix by one row per sequence. At
// batch 1 that is a matrix-vector product bound by the bytes of the weight,
// and the general matrix-multiply path reads those bytes well below what the
// memory delivers. This kernel streams each weight row once, from both
// threads, and takes its dot product with every input row while the weight
// row is still in L1. Registered as the torch op `kvengine::small_linear`;
// kvengine/engine/kernel.py builds and loads it.
//
// x       (M, K)  the input rows, float32 / bfloat16 / float16
// weight  (N, K)  contiguous, float32 / bfloat16 / float16 (need not match x)
// bias    (N) or None
// returns (M, N)  in x's dtype; products and sums in float32
//
// `kvengine::small_linear_q8` takes an int8 weight (N, K) with one float32
// scale per group of 32 along K, scales (N, K / 32): weight-only int8 in the
// layout of llama.cpp's Q8_0, a quarter of float32's bytes. `kvengine::small_linear_q4` takes
// 4-bit values (N, K / 2) uint8 with a float32 scale and minimum per group of 32, scales and
// mins (N, K / 32): llama.cpp's Q4_1 layout, an eighth of float32's bytes plus the group table.
//
// 16-bit weights are widened to float32 in registers, so a bfloat16 weight
// costs half the bytes of a float32 one even where the CPU has no bf16
// arithmetic.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace {

// Eight lanes of float32 in GCC / Clang vector extensions: the compiler maps them to the widest
// registers -march=native allows (AVX2 here, AVX-512 halves elsewhere).
typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8x32 __attribute__((vector_size(32)));
typedef uint16_t u8x16 __attribute__((vector_size(16)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f8 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  u8x16 h;
  std::memcpy(&h, p, sizeof h);
  const u8x32 bits = __builtin_convertvector(h, u8x32) << 16;
  f8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline f8 load8(const c10::Half* p) {
  f8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
// Eight int8 / uint8 values widened to float32 (exact). GCC leaves a plain conversion of 8-bit
// vectors scalar, so x86 gets the widening instructions themselves.
#if defined(__AVX2__)
inline f8 from_m256(__m256 v) {
  f8 out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
inline f8 load8(const int8_t* p) {
  return from_m256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}
inline f8 widen_u8(const uint8_t* p) {
  return from_m256(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}
#else
typedef int8_t i8x8 __attribute__((vector_size(8)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8v __attribute__((vector_size(8)));
inline f8 load8(const int8_t* p) {
  i8x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, i32x8), f8);
}
inline f8 widen_u8(const uint8_t* p) {
  u8x8v h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, i32x8), f8);
}
#endif
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

inline float hsum(f8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Dot products of one weight row with R input rows (R fixed: R x 2 accumulators in registers,
// each weight element loaded once).
template <int R, typename w_t>
inline void dot_rows(const w_t* __restrict w, const float* __restrict x, int64_t k_len, float* sums) {
  f8 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = f8{};
  int64_t k = 0;
  for (; k + 16 <= k_len; k += 16) {
    const f8 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      acc0[r] += w0 * load8(x + r * k_len + k);
      acc1[r] += w1 * load8(x + r * k_len + k + 8);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc0[r] + acc1[r]);
    for (int64_t j = k; j < k_len; ++j) s += widen(w[j]) * x[r * k_len + j];
    sums[r] = s;
  }
}

// The same for an int8 weight row in groups of 32 along K, each with its float32 scale.
template <int R>
inline void dot_rows_q8(const int8_t* __restrict w, const float* __restrict scales, const float* __restrict x,
                        int64_t k_len, float* sums) {
  f8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = f8{};
  for (int64_t k = 0, g = 0; k < k_len; k += 32, ++g) {
    const f8 w0 = load8(w + k), w1 = load8(w + k + 8), w2 = load8(w + k + 16), w3 = load8(w + k + 24);
    const float s = scales[g];
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * k_len + k;
      const f8 part = w0 * load8(xr) + w1 * load8(xr + 8) + w2 * load8(xr + 16) + w3 * load8(xr + 24);
      acc[r] += part * s;
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum(acc[r]);
}

// The same for a 4-bit weight row: per group of 32, 16 bytes (element j in the low nibble of byte
// j, element j + 16 in its high nibble), a scale and a minimum: w = q * scale + min, so the dot
// product is scale * sum(q * x) + min * sum(x), with the sums of x per group given in `xsums`.
typedef uint8_t u8x16b __attribute__((vector_size(16)));
inline f8 nibbles8(u8x16b v, int half) { return widen_u8(reinterpret_cast<const uint8_t*>(&v) + 8 * half); }

template <int R>
inline void dot_rows_q4(const uint8_t* __restrict w, const float* __restrict scales, const float* __restrict mins,
                        const float* __restrict x, const float* __restrict xsums, int64_t k_len, float* sums) {
  const int64_t groups = k_len / 32;
  f8 acc[R];
  float offset[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = f8{};
  for (int64_t g = 0; g < groups; ++g) {
    u8x16b bytes;
    std::memcpy(&bytes, w + 16 * g, sizeof bytes);
    const u8x16b lo = bytes & 0x0F, hi = bytes >> 4;
    const f8 w0 = nibbles8(lo, 0), w1 = nibbles8(lo, 1), w2 = nibbles8(hi, 0), w3 = nibbles8(hi, 1);
    const float s = scales[g], m = mins[g];
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * k_len + 32 * g;
      const f8 part = w0 * load8(xr) + w1 * load8(xr + 8) + w2 * load8(xr + 16) + w3 * load8(xr + 24);
      acc[r] += part * s;
      offset[r] += m * xsums[r * groups + g];
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum(acc[r]) + offset[r];
}

// What a quantized weight carries besides its values: null for a plain weight.
struct Quant {
  const float* scales = nullptr;
  const float* mins = nullptr;   // 4-bit only
  const float* xsums = nullptr;  // 4-bit only: sums of x per (row of x, group of 32)
};

// Row `n` of the weight, for R rows of x: plain, int8 or 4-bit in groups of 32.
template <int R, typename w_t>
inline void row_dots(const w_t* w, const Quant& quant, int64_t n, const float* x, int64_t k_len, float* sums) {
  if constexpr (std::is_same_v<w_t, int8_t>) {
    dot_rows_q8<R>(w + n * k_len, quant.scales + n * (k_len / 32), x, k_len, sums);
  } else if constexpr (std::is_same_v<w_t, uint8_t>) {
    const int64_t g = n * (k_len / 32);
    dot_rows_q4<R>(w + n * (k_len / 2), quant.scales + g, quant.mins + g, x, quant.xsums, k_len, sums);
  } else {
    dot_rows<R>(w + n * k_len, x, k_len, sums);
  }
}

template <typename w_t>
void run(const float* x, const w_t* w, const Quant& quant, const float* bias, float* out, int64_t m_len,
         int64_t n_len, int64_t k_len) {
  // Rows of x in groups of up to 4; every weight row is read once per group (from L1 after the
  // first group when M > 4).
  const int64_t grain = std::max<int64_t>(16, n_len / (4 * at::get_num_threads()));
  at::parallel_for(0, n_len, grain, [&](int64_t begin, int64_t end) {
    float sums[4];
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias == nullptr ? 0.0f : bias[n];
      for (int64_t m = 0; m < m_len; m += 4) {
        const int64_t r = std::min<int64_t>(4, m_len - m);
        const float* xm = x + m * k_len;
        Quant qm = quant;
        if (qm.xsums != nullptr) qm.xsums += m * (k_len / 32);
        switch (r) {
          case 1: row_dots<1>(w, qm, n, xm, k_len, sums); break;
          case 2: row_dots<2>(w, qm, n, xm, k_len, sums); break;
          case 3: row_dots<3>(w, qm, n, xm, k_len, sums); break;
          default: row_dots<4>(w, qm, n, xm, k_len, sums); break;
        }
        for (int64_t i = 0; i < r; ++i) out[(m + i) * n_len + n] = sums[i] + b;
      }
    }
  });
}

enum class Kind { plain, q8, q4 };

void check_group_table(const at::Tensor& t, int64_t n_len, int64_t k_len, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == n_len &&
                  t.size(1) == k_len / 32,
              "small_linear: ", what, " must be contiguous float32 (N, K / 32)");
}

// Checks and the float32 copies shared by the ops. K is x's width; a 4-bit weight row holds K / 2
// bytes.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, Kind kind, const at::Tensor* scales,
                       const at::Tensor* mins, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_linear: x must be (M, K) and weight (N, K)");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  const int64_t m_len = x.size(0), n_len = weight.size(0), k_len = x.size(1);
  TORCH_CHECK(weight.size(1) == (kind == Kind::q4 ? k_len / 2 : k_len), "small_linear: x and weight disagree on K");
  TORCH_CHECK(weight.is_contiguous(), "small_linear: the weight must be contiguous");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_len, "small_linear: bias must be (N,)");
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({m_len, n_len}, x.options().dtype(at::kFloat));
  const float* b = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  Quant quant;
  at::Tensor xsums;
  if (kind != Kind::plain) {
    TORCH_CHECK(k_len % 32 == 0, "small_linear: K must be a multiple of 32 for a quantized weight");
    check_group_table(*scales, n_len, k_len, "scales");
    quant.scales = scales->data_ptr<float>();
  }
  if (kind == Kind::q8) {
    TORCH_CHECK(weight.scalar_type() == at::kChar, "small_linear_q8: the weight must be int8");
    run(xp, weight.data_ptr<int8_t>(), quant, b, o, m_len, n_len, k_len);
  } else if (kind == Kind::q4) {
    TORCH_CHECK(weight.scalar_type() == at::kByte, "small_linear_q4: the weight must be uint8 (two 4-bit values)");
    check_group_table(*mins, n_len, k_len, "mins");
    quant.mins = mins->data_ptr<float>();
    xsums = xf.view({m_len, k_len / 32, 32}).sum(-1).contiguous();
    quant.xsums = xsums.data_ptr<float>();
    run(xp, weight.data_ptr<uint8_t>(), quant, b, o, m_len, n_len, k_len);
  } else {
    switch (weight.scalar_type()) {
      case at::kFloat: run(xp, weight.data_ptr<float>(), quant, b, o, m_len, n_len, k_len); break;
      case at::kBFloat16: run(xp, weight.data_ptr<c10::BFloat16>(), quant, b, o, m_len, n_len, k_len); break;
      case at::kHalf: run(xp, weight.data_ptr<c10::Half>(), quant, b, o, m_len, n_len, k_len); break;
      default: TORCH_CHECK(false, "small_linear: weights must be float32, bfloat16 or float16");
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_rows(x, weight, Kind::plain, nullptr, nullptr, bias);
}

at::Tensor small_linear_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias) {
  return linear_rows(x, qweight, Kind::q8, &scales, nullptr, bias);
}

at::Tensor small_linear_q4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& mins, const c10::optional<at::Tensor>& bias) {
  return linear_rows(x, qweight, Kind::q4, &scales, &mins, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvengine, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("small_linear_q8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("small_linear_q4(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvengine, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("small_linear_q8", &small_linear_q8);
  m.impl("small_linear_q4", &small_linear_q4);
}
