// RMSNorm and rotary embeddings on CPU, one pass over memory each (core/elementwise.py swaps
// them into Hugging Face models inside the engine's calls). Why: in eager torch an RMSNorm is
// six kernels (pow, mean, add, rsqrt, mul, mul) and a RoPE of q and k is twelve (cat, neg, four
// mul, two add per tensor), each a pass over [T, hidden]: ~8% of an MMLU prefill of the 70M
// Llama here (docs/varlen.md), work vLLM's CPU engine does in one C++ loop each.
//
// The arithmetic is Hugging Face's, operation for operation, with no fused multiply-add (the
// pragma below), so RoPE gives the same bits as `q * cos + rotate_half(q) * sin`; RMSNorm's
// mean of squares is summed in another order (within fp32 rounding). bf16 rounds after each
// operation as torch's bf16 kernels do.
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_vec.h"

static inline float widen(float x) { return x; }
static inline float widen(at::BFloat16 x) { return static_cast<float>(x); }
template <typename T> static inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }

// x [R, N] (rows contiguous), w [N] -> w * (x * rsqrt(mean(x^2) + eps)), in x's dtype.
template <typename T>
static void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * n;
      T* o = out + r * n;
      vf acc[4] = {};
      int64_t i = 0;
      for (; i + 4 * W <= n; i += 4 * W)
        for (int j = 0; j < 4; ++j) { vf v = load(xr + i + j * W); acc[j] += v * v; }
      for (; i + W <= n; i += W) { vf v = load(xr + i); acc[0] += v * v; }
      float sum = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
      for (; i < n; ++i) sum += widen(xr[i]) * widen(xr[i]);
      const float inv = 1.f / std::sqrt(sum / float(n) + eps);  // torch's rsqrt: 1 / sqrt, rounded twice
      for (int64_t c = 0; c < n; ++c)  // h = (x * inv) in the input dtype, then weight * h
        o[c] = static_cast<T>(widen(w[c]) * round_to<T>(widen(xr[c]) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "x [..., N] contiguous, weight [N]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight of one dtype");
  auto out = at::empty_like(x);
  const int64_t n = weight.size(0), rows = n ? x.numel() / n : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, n, float(eps));
  else if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                  rows, n, float(eps));
  else
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return out;
}

// One [D] row: first half x1 * c - x2 * s, second half x2 * c + x1 * s (rotate_half is
// cat(-x2, x1); negating is exact, so `+ (-x2 * s)` and `- x2 * s` round alike).
template <typename T>
static inline void rope_row(const T* x, const T* c, const T* s, T* o, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = widen(x[i]), x2 = widen(x[i + half]);
    o[i] = static_cast<T>(round_to<T>(x1 * widen(c[i])) - round_to<T>(x2 * widen(s[i])));
    o[i + half] = static_cast<T>(round_to<T>(x2 * widen(c[i + half])) + round_to<T>(x1 * widen(s[i + half])));
  }
}
static inline void rope_row(const float* x, const float* c, const float* s, float* o, int64_t half) {
  if (half % W) return rope_row<float>(x, c, s, o, half);
  for (int64_t i = 0; i < half; i += W) {
    const vf x1 = load(x + i), x2 = load(x + i + half);
    store(o + i, x1 * load(c + i) - x2 * load(s + i));
    store(o + i + half, x2 * load(c + i + half) + x1 * load(s + i + half));
  }
}

// x [A, B, C, D] (any strides, last dim contiguous), cos/sin broadcast to x's shape (stride 0
// where they broadcast) -> out (strides of its own).
template <typename T>
static void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  int dims[3] = {0, 1, 2};  // the outer dims in x's memory order, so rows are read in sequence
  std::sort(dims, dims + 3, [&](int a, int b) { return x.stride(a) > x.stride(b); });
  const int64_t b = x.size(dims[1]), c = x.size(dims[2]), half = x.size(3) / 2, rows = x.size(dims[0]) * b * c;
  const T *xp = x.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  int64_t st[4][3];  // strides of the three outer dims, in that order: x, cos, sin, out
  const at::Tensor* ts[4] = {&x, &cos, &sin, &out};
  for (int t = 0; t < 4; ++t) for (int d = 0; d < 3; ++d) st[t][d] = ts[t]->stride(dims[d]);
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i[3] = {r / (b * c), r / c % b, r % c};
      int64_t off[4];
      for (int t = 0; t < 4; ++t) off[t] = i[0] * st[t][0] + i[1] * st[t][1] + i[2] * st[t][2];
      rope_row(xp + off[0], cp + off[1], sp + off[2], op + off[3], half);
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.sizes() == x.sizes() && sin.sizes() == x.sizes(),
              "x [A, B, C, D], cos/sin expanded to x's shape");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1 && x.size(3) % 2 == 0,
              "last dim contiguous and even");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(), "one dtype");
  auto out = at::empty_like(x);  // x's strides where x is dense (a transposed view stays one), else contiguous
  if (x.scalar_type() == at::kFloat) rope_rows<float>(x, cos, sin, out);
  else if (x.scalar_type() == at::kBFloat16) rope_rows<at::BFloat16>(x, cos, sin, out);
  else TORCH_CHECK(false, "rope: float32 or bfloat16");
  return out;
}
