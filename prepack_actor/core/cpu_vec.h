// 16-float vectors shared by the CPU kernels (cpu_decode.cpp, cpu_prefill.cpp,
// cpu_elementwise.cpp): GCC vector extensions, one AVX-512 register where the machine has it
// (built with -march=native), else split by the compiler; GCC >= 12 and Clang.
// ATen's headers only, not torch/extension.h (the C++ frontend and pybind11); cpu_ops.cpp, the
// bindings, includes torch's pybind header. The whole build: 12.5 s, 52-54 s with extension.h.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>

typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
constexpr int W = 16;          // floats per vector

static inline vf load(const float* p) { vf x; std::memcpy(&x, p, sizeof x); return x; }
static inline vf load(const at::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  vi x; for (int i = 0; i < W; ++i) x[i] = int(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  vf f; std::memcpy(&f, &x, sizeof f); return f;
}
static inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
template <typename T> static inline void prefetch(const T* p, int64_t d) {
  for (int64_t c = 0; c < d * int64_t(sizeof(T)); c += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + c);
}

static inline float hsum(vf x) {  // a tree: 4 dependent adds, not 16
  x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return x[0];
}
static inline float hmax(vf x) { float m = x[0]; for (int i = 1; i < W; ++i) m = std::max(m, x[i]); return m; }

// exp(x) for x <= 0 (Cephes' expf: relative error ~2e-7); x < -87 -> 0, below fp32's smallest normal
static inline vf vexp(vf x) {
  const vf lo = vf{} - 87.f;
  vf xc = x < lo ? lo : x;
  vf n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;              // x - n ln 2, ln 2 in two parts
  vf p = vf{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f; p = p * r + 8.3334519073E-3f; p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f; p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
  vf s; std::memcpy(&s, &e, sizeof s);
  return x < lo ? vf{} : p * s;
}
