// Decode attention on CPU, one call per layer per step: each sequence's query heads against its
// own contiguous slot range of the block cache (core/block_attention.py, kernel "fused").
// Why a kernel: the per-row `bmm` loop costs ~13 us of dispatch per row and layer, and small
// GEMMs with 3 query rows run far from the core's peak (docs/decode.md has the numbers).
//
// q [B, H, D], k/v [slots, Hkv, D] (last dim contiguous), ranges [B, 2] int64 slot [start, end)
// -> out [B, H, D]. GQA: query head h reads kv head h / (H / Hkv). Softmax in fp32; bf16
// inputs are widened to fp32 and the output rounded once. D a multiple of 16, at most 256.
// Vectors: cpu_vec.h.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_vec.h"

constexpr int MAX_DV = 16;     // D / W at most (D <= 256)
constexpr int PREFETCH_K = W;  // keys ahead: the next score block
constexpr int PREFETCH_V = 8;  // values ahead

// 16 vectors -> one vector whose lane j is the sum of a[j]'s lanes (15 shuffle-adds, not 16 trees)
static inline vf hsum16(const vf* a) {
  vf b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: a[2j] halved, 8-15: a[2j+1]
    b[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + __builtin_shufflevector(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)  // quarters: a[4j] .. a[4j+3]
    c[j] = __builtin_shufflevector(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + __builtin_shufflevector(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)  // pairs of lanes: a[8j] .. a[8j+7]
    d[j] = __builtin_shufflevector(c[2 * j], c[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + __builtin_shufflevector(c[2 * j], c[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
       + __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

template <typename T>
static void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ranges,
                   double scale, at::Tensor& out) {
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hkv = k.size(1), g = h / hkv, dv = d / W;
  const int64_t ks = k.stride(0), kh = k.stride(1), vs = v.stride(0), vh = v.stride(1);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* rp = ranges.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<vf> qf(h * dv), acc(h * dv);  // scaled queries, output accumulators
    std::vector<float> w;                      // [H, n rounded up to W] scores, then weights
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = rp[2 * r], n = rp[2 * r + 1] - s, np = (n + W - 1) / W * W;
      for (int64_t i = 0; i < h * d; ++i) qf[i / W][i % W] = float(qp[r * h * d + i]) * float(scale);
      w.resize(h * np);
      for (int64_t j0 = 0; j0 < n; j0 += W) {  // scores of W keys at a time, all heads
        const int64_t m = std::min<int64_t>(W, n - j0);
        for (int64_t kvh = 0; kvh < hkv; ++kvh)
          for (int64_t gg = 0; gg < g; ++gg) {
            const int64_t hh = kvh * g + gg;
            vf a[W];
            for (int64_t j = 0; j < m; ++j) {
              const T* kj = kp + (s + j0 + j) * ks + kvh * kh;
              if (gg == 0) prefetch(kj + PREFETCH_K * ks, d);
              vf x = qf[hh * dv] * load(kj);
              for (int64_t c = 1; c < dv; ++c) x += qf[hh * dv + c] * load(kj + c * W);
              a[j] = x;
            }
            for (int64_t j = m; j < W; ++j) a[j] = vf{};
            vf sc = hsum16(a);
            for (int64_t j = m; j < W; ++j) sc[j] = -INFINITY;  // past the row's keys: weight 0
            store(w.data() + hh * np + j0, sc);
          }
      }
      for (int64_t hh = 0; hh < h; ++hh) {  // softmax per head
        float* wh = w.data() + hh * np;
        vf mv = vf{} - INFINITY;
        for (int64_t j = 0; j < np; j += W) { vf x = load(wh + j); mv = x > mv ? x : mv; }
        const float mx = hmax(mv);
        vf sum = vf{};
        for (int64_t j = 0; j < np; j += W) { vf e = vexp(load(wh + j) - mx); store(wh + j, e); sum += e; }
        const float inv = 1.f / hsum(sum);
        for (int64_t j = 0; j < np; j += W) store(wh + j, load(wh + j) * inv);
      }
      std::fill(acc.begin(), acc.end(), vf{});
      for (int64_t j = 0; j < n; ++j)  // weighted values, key by key (each value row read once)
        for (int64_t kvh = 0; kvh < hkv; ++kvh) {
          const T* vj = vp + (s + j) * vs + kvh * vh;
          prefetch(vj + PREFETCH_V * vs, d);
          vf vv[MAX_DV];
          for (int64_t c = 0; c < dv; ++c) vv[c] = load(vj + c * W);
          for (int64_t gg = 0; gg < g; ++gg) {
            const int64_t hh = kvh * g + gg;
            const float wj = w[hh * np + j];
            for (int64_t c = 0; c < dv; ++c) acc[hh * dv + c] += wj * vv[c];
          }
        }
      for (int64_t i = 0; i < h * d; ++i) op[r * h * d + i] = static_cast<T>(acc[i / W][i % W]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& ranges, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [B, H, D], k/v [slots, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k.stride(2) == 1 && v.stride(2) == 1, "last dims contiguous, q contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16");
  TORCH_CHECK(q.size(2) % W == 0 && q.size(2) <= W * MAX_DV, "head dim a multiple of 16, at most 256");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && k.sizes() == v.sizes(), "GQA: H a multiple of Hkv");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && ranges.is_contiguous() && ranges.size(0) == q.size(0)
              && ranges.size(1) == 2, "ranges [B, 2] int64");
  const int64_t* rp = ranges.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r)
    TORCH_CHECK(0 <= rp[2 * r] && rp[2 * r] < rp[2 * r + 1] && rp[2 * r + 1] <= k.size(0),
                "row ", r, ": slot range [", rp[2 * r], ", ", rp[2 * r + 1], ") empty or outside the pools");
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) attend<float>(q, k, v, ranges, scale, out);
  else attend<at::BFloat16>(q, k, v, ranges, scale, out);
  return out;
}

