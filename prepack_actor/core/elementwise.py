"""RMSNorm and rotary embeddings as one C++ pass each on CPU (cpu_elementwise.cpp), swapped into a
Hugging Face model for the duration of the engine's calls.

Eager torch runs an RMSNorm as six kernels and the RoPE of q and k as twelve, each a pass over
[T, hidden]: ~8% of an MMLU prefill of the 70M Llama here (docs/varlen.md), which vLLM's CPU
engine does in one C++ loop each. Inside `fused_elementwise(model)`:
- a module whose class name ends in "RMSNorm" runs `rms_norm` once its own forward gave the
  kernel's numbers on a probe (fp32, a random weight), so variants that differ (Gemma's
  `1 + weight`, norms without a weight) keep their forward;
- the `apply_rotary_pos_emb` of each modeling module the model's layers come from (the global
  their attention calls) runs `rope`, again only after a probe agreed with it; calls it cannot
  serve (partial rotary, other dtypes, tensors needing grad, traced by torch.compile) go to the
  original function.
Outside the block the model is plain Hugging Face. The kernels give RoPE's bits exactly and
RMSNorm's within fp32 rounding of the mean (tests/test_elementwise.py). Without a C++ compiler
(cpu_ops.refusal) nothing is swapped.
"""
from __future__ import annotations

import copy
import inspect
import sys
from contextlib import contextmanager
from functools import lru_cache

import torch

from . import cpu_ops
from .modules import scan

ENABLED = True  # module default (benchmarks compare with and without)
_PROBED = "_prepack_rms_norm"  # per norm module: its forward equals the kernel's (probed once)
_MARK = "_prepack_rope_of"  # on a RoPE wrapper: the function it stands in for


def _eps(module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _is_rms_norm(module) -> bool:
    """An RMSNorm whose forward is weight * (x * rsqrt(mean(x^2) + eps)) (checked once on a probe)."""
    w = getattr(module, "weight", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1 \
            or _eps(module) is None or w.dtype not in cpu_ops.DTYPES:
        return False
    if not hasattr(module, _PROBED):  # once: kernels() runs this on every entry (a decode step in the job loop)
        if len(inspect.signature(type(module).forward).parameters) != 2:  # (self, x): no gate, no residual
            setattr(module, _PROBED, False)
            return False
        with torch.no_grad():
            probe = copy.deepcopy(module).float().cpu()
            probe.weight.copy_(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0)))
            x = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(1))
            want = type(module).forward(probe, x)
            same = isinstance(want, torch.Tensor) and want.shape == x.shape and torch.allclose(
                cpu_ops.ops().rms_norm(x, probe.weight, _eps(module)), want, rtol=1e-5, atol=1e-6)
        setattr(module, _PROBED, same)
    return getattr(module, _PROBED)


def _norm_forward(module):
    weight, eps, original = module.weight, _eps(module), type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., N] -> [..., N]
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or x.dtype != weight.dtype \
                or x.device.type != "cpu" or x.shape[-1] != weight.shape[0]:
            return original(module, x)
        return cpu_ops.ops().rms_norm(x.contiguous(), weight, eps)
    return forward


def _servable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    return (x.dim() == 4 and cos.dim() == 3 and x.shape[-1] == cos.shape[-1] and x.shape[-1] % 2 == 0
            and x.device.type == "cpu" and x.dtype == cos.dtype and x.dtype in cpu_ops.DTYPES
            and x.stride(-1) == 1 and cos.stride(-1) == 1)


def _expands_to(c: torch.Tensor, x: torch.Tensor) -> bool:
    try:
        return torch.broadcast_shapes(x.shape, c.shape) == x.shape
    except RuntimeError:
        return False


def _rope(original):
    """A stand-in for a modeling module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""
    default_dim = inspect.signature(original).parameters["unsqueeze_dim"].default

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # q [B, H, T, D], k [B, Hkv, T, D], cos/sin [B, T, D]
        if torch.compiler.is_compiling() or args or set(kwargs) - {"unsqueeze_dim"} or torch.is_grad_enabled() \
                or not (_servable(q, cos) and _servable(k, cos) and sin.shape == cos.shape and sin.stride() == cos.stride()):
            return original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", default_dim)
        c, s = cos.unsqueeze(dim), sin.unsqueeze(dim)
        if not (_expands_to(c, q) and _expands_to(c, k)):
            return original(q, k, cos, sin, **kwargs)
        rope = cpu_ops.ops().rope
        return rope(q, c.expand_as(q), s.expand_as(q)), rope(k, c.expand_as(k), s.expand_as(k))
    setattr(apply_rotary_pos_emb, _MARK, original)
    return apply_rotary_pos_emb


@lru_cache(maxsize=None)
def _rope_probe(fn) -> bool:
    """fn takes (q, k, cos, sin, unsqueeze_dim) and its numbers equal the kernel's on random
    q, k, cos, sin (GQA: two query heads, one key head). Once per function."""
    if list(inspect.signature(fn).parameters) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return False
    wrapper = _rope(fn)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g)
    cos, sin = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        try:
            want = fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - another signature or convention: not this kernel's
            return False
        got = wrapper(q, k, cos, sin)
    return isinstance(want, tuple) and len(want) == 2 and all(
        isinstance(w, torch.Tensor) and w.shape == g_.shape and torch.allclose(g_, w, rtol=1e-6, atol=1e-6)
        for w, g_ in zip(want, got))


def _rope_modules(modules) -> list:
    """The modeling modules (python modules) whose apply_rotary_pos_emb these layers call,
    probed on the original function (a swapped one is marked with it)."""
    found = {}
    for m in modules:
        mod = sys.modules.get(type(m).__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        fn = getattr(fn, _MARK, fn)
        if mod is None or mod.__name__ in found or not inspect.isfunction(fn):
            continue
        if _rope_probe(fn):
            found[mod.__name__] = mod
    return list(found.values())


@contextmanager
def fused_elementwise(model, enabled: bool = True):
    """Inside the block the model's RMSNorms and RoPE run the C++ kernels (see the module's doc).
    No-op when disabled, off CPU or without the kernels. Re-entrant."""
    on = enabled and ENABLED and cpu_ops.refusal(torch.empty(0, dtype=model.dtype, device=model.device)) is None
    norms = [m for m in scan(model, "rms_norm", lambda ms: (m for m in ms if type(m).__name__.endswith("RMSNorm")))
             if "forward" not in m.__dict__ and _is_rms_norm(m)] if on else []
    ropes = [mod for mod in scan(model, "rope", _rope_modules)
             if not hasattr(mod.apply_rotary_pos_emb, _MARK)] if on else []  # not already swapped (re-entered)
    try:
        for m in norms:
            m.__dict__["forward"] = _norm_forward(m)  # as Module.__setattr__ would, minus its checks
        for mod in ropes:
            mod.apply_rotary_pos_emb = _rope(mod.apply_rotary_pos_emb)
        yield
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)
        for mod in ropes:
            mod.apply_rotary_pos_emb = getattr(mod.apply_rotary_pos_emb, _MARK)
