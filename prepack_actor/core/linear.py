"""Linear layers on oneDNN with prepacked weights, on CPU.

On CPU ~85% of a prefill and most of a decode step is `nn.Linear`. torch's `F.linear` calls
MKL's sgemm; oneDNN's matmul with its weight reordered once into oneDNN's blocked layout
(what vLLM's CPU engine and inductor's freezing pass use) ran 10-15% faster prefill and
9-17% faster end to end on the 70M Llama here (docs/varlen.md, "Linear layers").

Gated MLPs (`down(silu(gate(x)) * up(x))`: Llama, Qwen, Mistral, ...) also fuse the SiLU
into the gate's matmul and the product into the up matmul (oneDNN post-ops, as vLLM's
`silu_and_mul`): ~6% faster prefill here. A module is fused only after its own forward gave
the same numbers on a probe input, so an MLP of another shape keeps its forward. Prefill runs
the MLP in passes of MLP_ROWS rows; on Intel CPUs those passes run on MKL's sgemm instead
(MKL_MLP), which is faster than oneDNN there at prefill sizes and slower at decode sizes.

The swap is scoped: `onednn_linear(model)` points each `nn.Linear` at its packed weight for
the duration of a `with` block and restores torch's forward after, so a model used outside
the engine (a Hugging Face reference, `generate`) runs unchanged. The packed weights are a
second copy (the model's own weights stay: tied embeddings and state_dict read them).
"""
from __future__ import annotations

import platform
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from .modules import scan

DTYPES = (torch.float32, torch.bfloat16)
# per module: (weight version, weight data_ptr, packed weight); beside the module, not on it,
# so copy.deepcopy(model) works after engine calls (oneDNN's packed tensors cannot be copied)
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_GATED = "_prepack_gated"  # per MLP module: its forward is down(silu(gate(x)) * up(x))
_GATED_PARTS = ("gate_proj", "up_proj", "down_proj")  # a gated MLP's linear layers, by Hugging Face's names
# Rows per gated-MLP pass. The up matmul's "mul" post-op reads silu(gate(x)) [rows, intermediate]
# back: 1,024 rows of the 70M Llama (8 MB) stay in cache, a 7,000-token group's (57 MB) do not.
# MMLU prefill 1.05-1.10x here, logits bit-identical (docs/varlen.md, "Gated MLPs in row passes").
MLP_ROWS = 1024


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return platform.processor()


# fp32 MLP passes of >= MKL_MIN_ROWS rows on MKL's sgemm (torch's F.linear on the model's own
# weights: no copy) on Intel CPUs: on a 2-vCPU Xeon the 70M Llama's MLP ran 142-152 GFLOP/s on
# MKL against oneDNN's 133-141 at 1,024-2,048 rows, MMLU prefill 1.04-1.10x. Below 512 rows
# (decode batches) oneDNN's fused post-ops win (109 vs 94 GFLOP/s at 64 rows), and on AMD CPUs
# MKL is slower throughout (docs/varlen.md, "Gated MLPs in row passes").
MKL_MLP = torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"
MKL_MIN_ROWS = 512


def onednn_refusal(model) -> str | None:
    """Why this model's linear layers stay on torch's kernel, or None when oneDNN serves them."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if model.device.type != "cpu":
        return f"device {model.device.type} (oneDNN linear is the CPU path)"
    if model.dtype not in DTYPES:
        return f"dtype {model.dtype} (oneDNN linear serves float32 and bfloat16)"
    return None


def _packed(module: nn.Linear) -> torch.Tensor:
    """The module's weight [out, in] reordered for oneDNN, packed once (again if it changes)."""
    w = module.weight
    key = (w._version, w.data_ptr())
    cached = _PACKED.get(module)
    if cached is None or cached[:2] != key:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference mode
            cached = (*key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        _PACKED[module] = cached
    return cached[2]


def _forward(module: nn.Linear):
    weight, bias = _packed(module), module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype != weight.dtype:  # e.g. an fp32 head over bf16 hidden states: torch's path
            return nn.functional.linear(x, module.weight, bias)
        if torch.compiler.is_compiling():  # opaque to inductor, which cannot lower the packed weight
            return packed_linear(x, weight, bias, module.out_features)
        return _linear_packed(x, weight, bias)
    return forward


def _linear_packed(x, weight, bias):
    """x @ weight.T + bias on a packed weight (oneDNN)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# The same calls as custom ops, for compiled graphs (core/compile.py): inductor fuses the
# elementwise work around them and calls oneDNN on the packed weights as they are.
@torch.library.custom_op("prepack::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return _linear_packed(x, weight, bias)


@packed_linear.register_fake
def _(x, weight, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("prepack::packed_gated_mlp", mutates_args=())
def packed_gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
                     out_features: int) -> torch.Tensor:
    return _gated_passes(x, (gate, up, down, gate_bias, up_bias, down_bias), None, out_features)


@packed_gated_mlp.register_fake
def _(x, gate, up, down, gate_bias, up_bias, down_bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def _gated_passes(x, packed, plain, out_features):
    """down(silu(gate(x)) * up(x)), MLP_ROWS rows at a time, each pass written into one output
    [N, out]. packed: (gate, up, down, biases...) on oneDNN; plain: the same with the [out, in]
    weights, for MKL passes (a call of >= MKL_MIN_ROWS rows where MKL_MLP; None = never)."""
    rows = x.contiguous().reshape(-1, x.shape[-1])  # [N, hidden]
    n = rows.shape[0]
    mkl = plain is not None and MKL_MLP and n >= MKL_MIN_ROWS
    if n <= MLP_ROWS and not mkl:  # a decode step: one pass, no copy
        return _gated_rows(rows, *packed).reshape(*x.shape[:-1], -1)
    out = rows.new_empty(n, out_features)  # [N, out]
    for i in range(0, n, MLP_ROWS):
        if mkl:
            _gated_mkl(rows[i:i + MLP_ROWS], *plain, out=out[i:i + MLP_ROWS])
        else:
            out[i:i + MLP_ROWS] = _gated_rows(rows[i:i + MLP_ROWS], *packed)
    return out.reshape(*x.shape[:-1], -1)


def _gated_rows(x, gate, up, down, gate_bias, up_bias, down_bias):  # [n, hidden] -> [n, hidden]
    """One oneDNN pass: SiLU and the product fused as post-ops of the gate and up matmuls."""
    g = torch.ops.mkldnn._linear_pointwise(x, gate, gate_bias, "swish", [], "")  # [n, inter] silu(gate(x))
    h = torch.ops.mkldnn._linear_pointwise(x, g, up, up_bias, "mul")  # [n, inter] up(x) * g
    return _linear_packed(h, down, down_bias)


def _gated_mkl(x, gate, up, down, gate_bias, up_bias, down_bias, out):  # [n, hidden] -> out [n, hidden]
    """One MKL pass on the [out, in] weights; SiLU and the product in place on the gate's output."""
    h = nn.functional.silu(nn.functional.linear(x, gate, gate_bias), inplace=True)  # [n, inter]
    h.mul_(nn.functional.linear(x, up, up_bias))
    if down_bias is None:
        torch.mm(h, down.T, out=out)
    else:
        torch.addmm(down_bias, h, down.T, out=out)


def _gated_shape(modules):
    """The modules shaped as gated MLPs (gate_proj, up_proj, down_proj, act_fn); _gated checks the rest."""
    return (m for m in modules if all(isinstance(getattr(m, n, None), nn.Module) for n in (*_GATED_PARTS, "act_fn")))


def _gated(module: nn.Module) -> bool:
    """A gated SiLU MLP whose forward equals down(silu(gate(x)) * up(x)) (checked once on a probe)."""
    parts = [getattr(module, n, None) for n in _GATED_PARTS]
    if not all(type(p) is nn.Linear and p.weight.dtype in DTYPES for p in parts) \
            or type(getattr(module, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return False
    if not hasattr(module, _GATED):
        gate, up, down = parts
        with torch.inference_mode(False), torch.no_grad():
            x = torch.randn(3, gate.in_features, dtype=gate.weight.dtype, generator=torch.Generator().manual_seed(0))
            want = down(nn.functional.silu(gate(x)) * up(x))
            setattr(module, _GATED, torch.allclose(module.forward(x), want, rtol=1e-4, atol=1e-5))
    return getattr(module, _GATED)


def _gated_forward(module: nn.Module):
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    biases = (gate.bias, up.bias, down.bias)
    packed = (_packed(gate), _packed(up), _packed(down), *biases)
    plain = (gate.weight.detach(), up.weight.detach(), down.weight.detach(), *biases) \
        if gate.weight.dtype == torch.float32 else None  # MKL passes: fp32 only (sgemm)

    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., hidden]
        if x.dtype != gate.weight.dtype:
            return down(nn.functional.silu(gate(x)) * up(x))
        if torch.compiler.is_compiling():
            return packed_gated_mlp(x, *packed, down.out_features)
        return _gated_passes(x, packed, plain, down.out_features)
    return forward


@contextmanager
def onednn_linear(model, enabled: bool = True):
    """Inside the block every plain `nn.Linear` of `model` runs oneDNN on its packed weight,
    and gated SiLU MLPs run fused. No-op when `enabled` is False or `onednn_refusal(model)`
    says why not. Re-entrant."""
    on = enabled and onednn_refusal(model) is None
    mlps = [m for m in scan(model, "gated_mlp", _gated_shape) if "forward" not in m.__dict__ and _gated(m)] if on else []
    modules = [m for m in scan(model, "linear", lambda ms: (m for m in ms if type(m) is nn.Linear))
               if m.weight.dtype in DTYPES and "forward" not in m.__dict__] if on else []
    try:
        for m in mlps:
            m.__dict__["forward"] = _gated_forward(m)  # what Module.__setattr__ does for a function, minus its checks
        for m in modules:
            m.__dict__["forward"] = _forward(m)
        yield
    finally:
        for m in mlps + modules:
            m.__dict__.pop("forward", None)
