// The Python module of prepack's CPU kernels (core/cpu_ops.py builds it on first use).
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>  // the at::Tensor caster; not torch/extension.h (it adds the C++ frontend: 16 s of headers here, against 5 s)

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& ranges, double scale);  // cpu_decode.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& bounds, double scale, int64_t window);  // cpu_prefill.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);  // cpu_elementwise.cpp
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);  // cpu_elementwise.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "q [B, H, D], k/v [slots, Hkv, D], ranges [B, 2] -> [B, H, D]");
  m.def("prefill_attention", &prefill_attention,
        "q [T, H, D], k/v [T, Hkv, D], bounds [P+1], scale, window (0: none) -> [T, H, D], causal per prompt");
  m.def("rms_norm", &rms_norm, "x [..., N], weight [N], eps -> weight * x / rms(x)");
  m.def("rope", &rope, "x [A, B, C, D], cos/sin expanded to x -> x * cos + rotate_half(x) * sin");
}
