"""Attention masks for packed rows: block-diagonal causal, as small pure functions.

The predicate is gpt-fast's `causal_mask(q, kv) = q >= kv` with one more condition:
query and key belong to the same prompt. Pad slots (segment -1) form one segment of
their own, so every query row has at least one visible key and softmax never sees an
all-masked row (which gives NaN in sdpa).
"""
from __future__ import annotations

import torch


def block_causal(segment_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """segment_ids: [R, W] -> bool mask [R, 1, W, W], True where query q may attend key k."""
    w = segment_ids.shape[-1]
    q = torch.arange(w, device=segment_ids.device)[:, None]  # [W, 1]
    k = torch.arange(w, device=segment_ids.device)[None, :]  # [1, W]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [R, W, W]
    return (same & allowed)[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> float mask for implementations that add the mask to the scores (eager)."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


def for_model(model, segment_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed mask in the form the model's attention implementation expects.

    Models that mix full and sliding-window layers (layer_types) take a dict of masks,
    one per layer type; single-type models take one tensor.
    """
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)

    def build(w: int | None) -> torch.Tensor:
        mask = block_causal(segment_ids, w)
        return mask if cfg._attn_implementation == "sdpa" else additive(mask, model.dtype)

    if layer_types:
        return {t: build(window if t == "sliding_attention" else None) for t in set(layer_types)}
    return build(window)
