// Causal prefill attention over a packed stream on CPU, one call per layer for every prompt
// (core/attention.py, CPU kernel "fused"). Why: one sdpa per prompt ran ~55 GFLOP/s here (its
// flash kernel's small GEMMs, and a dispatch per prompt and layer); this kernel blocks the
// work as a GEMM micro-kernel does (docs/varlen.md has the numbers).
//
// q [T, H, D], k/v [T, Hkv, D] (last dim contiguous, any other strides), bounds [P+1] int64
// (prompt p is stream rows [bounds[p], bounds[p+1])), window (0: none; else query i sees keys
// j with i - window < j <= i) -> out [T, H, D]. GQA: query head h reads kv head h / (H / Hkv).
// Per (prompt, kv head): K is packed once as K^T in blocks of 16 keys; then per chunk of R
// (query position, head) rows: scores = q . K^T (each key block one vector per row, q's
// elements broadcast), an exact softmax over the row's keys in fp32, out = P . V. bf16 inputs
// are widened to fp32 and the output rounded once. D a multiple of 16, at most 256.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"

constexpr int R = 8;          // rows per chunk: 8 score vectors in registers per key block
constexpr int RV = 4;         // rows per pass of P . V (RV x 4 output vectors in registers)
constexpr int MAX_D = 256;

// out rows += P . V for RV rows and NC vectors of D (registers: RV x NC accumulators). p: the
// rows' softmax numerators (row r's key j at p[r * n + j - j0]), v: key j's vectors at v + j * vs0.
template <int NC, typename T>
static inline void pv_rows(const float* p, int64_t n, int64_t j0, const T* v, int64_t vs0, int64_t jlo, int64_t jhi,
                           const float* inv, const int64_t* pos, const int64_t* head, int nr, T* out,
                           const int64_t os[2]) {
  vf acc[RV][NC] = {};
  for (int64_t j = jlo; j <= jhi; ++j) {
    vf vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load(v + j * vs0 + c * W);
    for (int r = 0; r < RV; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] += p[r * n + j - j0] * vv[c];
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < NC; ++c) {
      T* o = out + pos[r] * os[0] + head[r] * os[1] + c * W;
      const vf x = acc[r][c] * inv[r];
      for (int i = 0; i < W; ++i) o[i] = static_cast<T>(x[i]);
    }
}

template <typename T>
static void prompt_head(const T* q, const T* k, const T* v, T* out, int64_t len, int64_t window, int64_t g_heads,
                        int64_t kvh, int64_t d, const int64_t qs[2], const int64_t ks[2], const int64_t vs[2],
                        const int64_t os[2], float scale, std::vector<float>& kt, std::vector<float>& sc) {
  const int64_t nkb = (len + W - 1) / W, dv = d / W, rows = len * g_heads;
  kt.resize(nkb * d * W);
  for (int64_t b = 0; b < nkb; ++b)  // kt[b][c][j] = K[16 b + j][c], zero past the end
    for (int64_t j = 0; j < W; ++j) {
      const int64_t key = b * W + j;
      for (int64_t c = 0; c < d; ++c)
        kt[(b * d + c) * W + j] = key < len ? static_cast<float>(k[key * ks[0] + kvh * ks[1] + c]) : 0.f;
    }
  sc.resize(R * nkb * W);
  float qf[MAX_D * R];  // the chunk's queries, [D][R]: one base address for the 8 broadcasts
  for (int64_t f0 = 0; f0 < rows; f0 += R) {
    const int64_t nr = std::min<int64_t>(R, rows - f0);
    int64_t pos[R], head[R], lo[R];
    for (int r = 0; r < R; ++r) {  // row f: query position f / G, head kvh * G + f % G (padding rows repeat the last)
      const int64_t f = f0 + std::min<int64_t>(r, nr - 1);
      pos[r] = f / g_heads, head[r] = kvh * g_heads + f % g_heads;
      lo[r] = window ? std::max<int64_t>(0, pos[r] - window + 1) : 0;
      for (int64_t c = 0; c < d; ++c) qf[c * R + r] = static_cast<float>(q[pos[r] * qs[0] + head[r] * qs[1] + c]);
    }
    const int64_t jlo = lo[0], jhi = pos[nr - 1];  // the chunk's keys: rows ascend in position, so lo too
    const int64_t b0 = jlo / W, b1 = jhi / W + 1;  // key blocks [b0, b1)
    const int64_t n = (b1 - b0) * W;  // scores per row in sc, keys from 16 b0
    for (int64_t b = b0; b < b1; ++b) {  // scores: 8 accumulators, one K^T load per 8 FMAs (q broadcast from memory)
      vf acc[R] = {};
      const float* kb = kt.data() + b * d * W;
      for (int64_t c = 0; c < d; ++c) {
        const vf kc = load(kb + c * W);
        for (int r = 0; r < R; ++r) acc[r] += qf[c * R + r] * kc;
      }
      for (int r = 0; r < R; ++r) store(sc.data() + r * n + (b - b0) * W, acc[r] * scale);
    }
    float inv[R];
    for (int r = 0; r < R; ++r) {  // softmax over keys [lo, pos]: the rest of the row becomes 0
      float* s = sc.data() + r * n;
      const int64_t first = lo[r] - b0 * W, last = pos[r] - b0 * W;  // inclusive, in the row
      for (int64_t j = 0; j < first; ++j) s[j] = -std::numeric_limits<float>::infinity();
      for (int64_t j = last + 1; j < n; ++j) s[j] = -std::numeric_limits<float>::infinity();
      vf m[2] = {vf{} - std::numeric_limits<float>::infinity(), vf{} - std::numeric_limits<float>::infinity()};
      for (int64_t j = 0; j < n; j += W) { vf x = load(s + j); m[(j / W) & 1] = m[(j / W) & 1] > x ? m[(j / W) & 1] : x; }
      const float mx = hmax(m[0] > m[1] ? m[0] : m[1]);
      vf sum = {};
      for (int64_t j = 0; j < n; j += W) { vf e = vexp(load(s + j) - mx); store(s + j, e); sum += e; }
      inv[r] = 1.f / hsum(sum);
    }
    for (int r0 = 0; r0 < nr; r0 += RV)
      for (int64_t c0 = 0; c0 < dv; c0 += 4) {
        const int64_t rest = dv - c0;
        auto pv = [&](auto nc) { pv_rows<nc.value>(sc.data() + r0 * n, n, b0 * W, v + kvh * vs[1] + c0 * W, vs[0],
                                                  jlo, jhi, inv + r0, pos + r0, head + r0, int(std::min<int64_t>(RV, nr - r0)),
                                                  out + c0 * W, os); };
        if (rest >= 4) pv(std::integral_constant<int, 4>{});
        else if (rest == 3) pv(std::integral_constant<int, 3>{});
        else if (rest == 2) pv(std::integral_constant<int, 2>{});
        else pv(std::integral_constant<int, 1>{});
      }
  }
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bounds,
                             double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [T, H, D], k/v [T, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "last dims contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16");
  const int64_t t = q.size(0), h = q.size(1), d = q.size(2), hkv = k.size(1);
  TORCH_CHECK(d % W == 0 && d <= MAX_D, "head dim a multiple of 16, at most 256");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == t && k.size(2) == d && h % hkv == 0, "GQA: H a multiple of Hkv");
  TORCH_CHECK(window >= 0, "window >= 0 (0: none)");
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.is_contiguous() && bounds.dim() == 1 && bounds.size(0) >= 2,
              "bounds [P+1] int64");
  const int64_t* bp = bounds.data_ptr<int64_t>();
  const int64_t np = bounds.size(0) - 1;
  TORCH_CHECK(bp[0] == 0 && bp[np] == t, "bounds run from 0 to T");
  for (int64_t p = 0; p < np; ++p) TORCH_CHECK(bp[p] < bp[p + 1], "prompt ", p, " is empty");
  auto out = at::empty({t, h, d}, q.options());
  const int64_t qs[2] = {q.stride(0), q.stride(1)}, ks[2] = {k.stride(0), k.stride(1)},
                vs[2] = {v.stride(0), v.stride(1)}, os[2] = {h * d, d};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, np * hkv, 1, [&](int64_t a, int64_t e) {
      std::vector<float> kt, sc;  // per thread: packed K^T, scores
      for (int64_t i = a; i < e; ++i) {
        const int64_t p = i / hkv, s = bp[p];
        prompt_head<T>(qp + s * qs[0], kp + s * ks[0], vp + s * vs[0], op + s * os[0], bp[p + 1] - s, window,
                       h / hkv, i % hkv, d, qs, ks, vs, os, float(scale), kt, sc);
      }
    });
  };
  if (q.scalar_type() == at::kFloat) run(float{});
  else run(at::BFloat16{});
  return out;
}
