"""Linear layers on oneDNN with prepacked weights, on CPU.

On CPU ~85% of a prefill and most of a decode step is `nn.Linear`. torch's `F.linear` calls
MKL's sgemm; oneDNN's matmul with its weight reordered once into oneDNN's blocked layout
(what vLLM's CPU engine and inductor's freezing pass use) ran 10-15% faster prefill and
9-17% faster end to end on the 70M Llama here (docs/varlen.md, "Linear layers").

The swap is scoped: `onednn_linear(model)` points each `nn.Linear` at its packed weight for
the duration of a `with` block and restores torch's forward after, so a model used outside
the engine (a Hugging Face reference, `generate`) runs unchanged. The packed weights are a
second copy (the model's own weights stay: tied embeddings and state_dict read them).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)
_PACKED = "_prepack_onednn"  # per module: (weight version, weight data_ptr, packed weight)


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
    cached = getattr(module, _PACKED, None)
    if cached is None or cached[:2] != key:
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference mode
            cached = (*key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        setattr(module, _PACKED, cached)
    return cached[2]


def _forward(module: nn.Linear):
    weight, bias = _packed(module), module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype != weight.dtype:  # e.g. an fp32 head over bf16 hidden states: torch's path
            return nn.functional.linear(x, module.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return forward


@contextmanager
def onednn_linear(model, enabled: bool = True):
    """Inside the block every plain `nn.Linear` of `model` runs oneDNN on its packed weight.

    No-op when `enabled` is False or `onednn_refusal(model)` says why not. Re-entrant."""
    modules = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype in DTYPES
               and "forward" not in m.__dict__] if enabled and onednn_refusal(model) is None else []
    try:
        for m in modules:
            m.forward = _forward(m)
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
