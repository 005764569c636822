"""Attention masks for packed rows, as one small pure predicate.

gpt-fast's `causal_mask(q, kv) = q >= kv`, with the conditions packing adds. Query q may
see key k when

    same unit  and  (k is a prompt token or k is on q's branch)  and  pos[k] <= pos[q]
    [and pos[q] - pos[k] < window on sliding-window layers]
    [and pos[q] // chunk == pos[k] // chunk on chunked-attention layers (Llama 4)]

With no branches this is block-diagonal causal (the paper's layout); with branches it is
the prompt-shared tree used for scoring. Causality is by position, not by column,
because sibling branches reuse the same positions. The pad run at a row's end (unit -1,
branch 0) is causal over itself, so no query row is all-masked (NaN in sdpa).
"""
from __future__ import annotations

import torch

from . import attention
from .packing import PackedBatch


def packed_causal(segment_ids: torch.Tensor, position_ids: torch.Tensor, branch_ids: torch.Tensor | None = None,
                  sliding_window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """[R, W] each -> bool mask [R, 1, W, W], True where query q may attend key k."""
    q_pos, k_pos = position_ids[:, :, None], position_ids[:, None, :]  # [R, W, 1], [R, 1, W]
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (k_pos <= q_pos)  # [R, W, W]
    if branch_ids is not None:
        k_branch = branch_ids[:, None, :]  # [R, 1, W]
        allowed &= (k_branch == 0) | (k_branch == branch_ids[:, :, None])
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    if chunk is not None:
        allowed &= q_pos // chunk == k_pos // chunk
    return allowed[:, None]


def dense_reference(segment_ids: list[int], position_ids: list[int], branch_ids: list[int] | None = None,
                    sliding_window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """The same predicate with Python loops over one row, for tests: [W, W] bool."""
    w = len(segment_ids)
    branch_ids = branch_ids or [0] * w
    out = torch.zeros((w, w), dtype=torch.bool)
    for q in range(w):
        for k in range(w):
            out[q, k] = (segment_ids[q] == segment_ids[k] and branch_ids[k] in (0, branch_ids[q])
                         and position_ids[k] <= position_ids[q]
                         and (sliding_window is None or position_ids[q] - position_ids[k] < sliding_window)
                         and (chunk is None or position_ids[q] // chunk == position_ids[k] // chunk))
    return out


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> float mask for implementations that add the mask to the scores (eager)."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


def for_model(model, batch: PackedBatch) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed mask in the form the model's attention implementation expects.

    sdpa takes the bool mask; eager adds the mask to the scores, so it gets 0 / dtype min.
    Models that mix full, sliding-window and chunked layers (layer_types) take one mask per type.
    """
    cfg = model.config
    device = model.device
    seg, pos = batch.segment_ids.to(device), batch.position_ids.to(device)
    branch = batch.branch_ids.to(device) if len(batch.branch_length) else None
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)

    def build(w: int | None, chunk: int | None = None) -> torch.Tensor:
        mask = packed_causal(seg, pos, branch, w, chunk)
        return mask if cfg._attn_implementation in ("sdpa", attention.NAME) else additive(mask, model.dtype)

    if layer_types:
        chunk = getattr(cfg, "attention_chunk_size", None)
        return {t: build(window if t == "sliding_attention" else None, chunk if t == "chunked_attention" else None)
                for t in set(layer_types)}
    return build(window)
