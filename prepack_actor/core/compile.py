"""Decoder layers through torch.compile (inductor), scoped like core/linear.py: the one place
prepack compiles.

Why: with the linear layers on oneDNN (~80% of a CPU prefill) and attention per prompt
(~6%), ~13% is elementwise work (RMSNorm, RoPE, residual adds), each op a pass over
[T, hidden]. inductor fuses it into a few C++ loops, as vLLM's CPU engine does
(docs/varlen.md, "Compiled decoder layers", has the numbers).

What is compiled: each decoder layer (the classes in the model's `_no_split_modules`),
dynamic shapes, once per model and reused by every call. The linear layers stay oneDNN calls
on their packed weights (custom ops in linear.py, opaque to inductor); the cache update and
the attention function run eager between the compiled pieces (graph breaks): both walk
Python lists (prompt bounds, block runs) that change every call.

A compile error (no C++ compiler, an op dynamo cannot trace) turns compiling off for that
model with one warning, and the call runs eager: same numbers within fp32 rounding.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

_COMPILED = "_prepack_compiled"  # per layer: its compiled forward
_FAILED = "_prepack_compile_failed"  # per model: why compiling failed (then it stays eager)
RECOMPILES = 32  # graphs per layer class (dynamo's default, 8, is met by one model's call kinds)


def decoder_layers(model) -> list[nn.Module]:
    """The model's decoder layers: modules of the classes it names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_refusal(model) -> str | None:
    """Why this model's layers stay eager, or None when compiled() compiles them."""
    if getattr(model, _FAILED, None):
        return f"compiling failed earlier: {getattr(model, _FAILED)}"
    if model.training:
        return "the model is in training mode"
    layers = decoder_layers(model)
    if not layers:
        return f"{type(model).__name__} names no decoder layer class (_no_split_modules)"
    if any(m._forward_hooks or m._forward_pre_hooks for m in layers):
        return "its decoder layers carry hooks (e.g. accelerate's offloading), which the compiled forward would skip"
    return None


@contextmanager
def compiled(model, enabled: bool = True):
    """Inside the block the model's decoder layers run compiled (see the module docstring).
    No-op when `enabled` is False or compile_refusal(model) says why not. Re-entrant."""
    on = enabled and compile_refusal(model) is None
    layers = [m for m in decoder_layers(model) if m._compiled_call_impl is None] if on else []
    try:
        for m in layers:
            m._compiled_call_impl = _call(model, m)
        yield
    finally:
        for m in layers:
            m._compiled_call_impl = None


def _call(model, layer: nn.Module):
    # The layer class's forward, not Module._call_impl: dynamo keeps compiled code per code
    # object, and _call_impl's would be shared by every module class in the process.
    fn = layer.__dict__.get(_COMPILED)
    if fn is None:
        fn = layer.__dict__[_COMPILED] = torch.compile(layer.forward, dynamic=True)

    def call(*args, **kwargs):
        if getattr(model, _FAILED, None):
            return layer._call_impl(*args, **kwargs)
        try:
            # layer_idx and friends are ints on the module: one graph for every layer, not one
            # each. A layer class meets prefill, decode, scoring and batch-of-one shapes: up to
            # RECOMPILES graphs before dynamo runs it eager.
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=RECOMPILES):
                return fn(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # BackendCompilerFailed (no compiler), Unsupported, ...
            setattr(model, _FAILED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            warnings.warn(f"prepack: torch.compile failed, running eager: {getattr(model, _FAILED)}", stacklevel=2)
            return layer._call_impl(*args, **kwargs)
    return call


def opaque(fn):
    """`fn` runs eager inside compiled code (a graph break): cache updates and attention."""
    return torch.compiler.disable(fn, recursive=True)


def opaque_cache(cache):
    """A transformers cache whose `update` runs eager inside compiled layers: it appends to or
    replaces tensors held in Python lists, which compiled code must not bake in. Returns it."""
    cache.update = opaque(cache.update)
    return cache
