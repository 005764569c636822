"""Packed prefill: one forward pass over packed rows fills every prompt's KV cache."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from . import masks
from .packing import PackedBatch


@torch.inference_mode()
def packed_forward(model, packed: PackedBatch, columns: torch.Tensor | None = None):
    """Run the packed rows; returns (logits [R, C, V] at `columns` (all if None), cache).

    `columns` narrows the LM head to the positions we need (the last token of each
    prompt), which saves R x W x V work on the head.
    """
    device = model.device
    kwargs = {}
    if columns is not None and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = columns.to(device)
    out = model(
        input_ids=packed.input_ids.to(device),  # [R, W]
        position_ids=packed.position_ids.to(device),  # [R, W]
        attention_mask=masks.for_model(model, packed.segment_ids.to(device)),  # [R, 1, W, W]
        past_key_values=DynamicCache(),  # plain layers: a sliding layer would drop other prompts' keys
        use_cache=True,
        **kwargs,
    )
    logits = out.logits
    if columns is not None and "logits_to_keep" not in kwargs:
        logits = logits[:, columns.to(device)]
    return logits, out.past_key_values


def last_token_logits(model, packed: PackedBatch):
    """Per-prompt next-token logits [P, V] (fp32) and the packed cache."""
    row, col = packed.last_index
    columns, col_in_kept = torch.unique(col, return_inverse=True)  # [C], [P]
    logits, cache = packed_forward(model, packed, columns)  # [R, C, V]
    return logits[row.to(logits.device), col_in_kept.to(logits.device)].float(), cache


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
