"""Packed prefill: one forward pass over packed rows fills every prompt's KV cache."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from . import masks
from .packing import PackedBatch


@contextmanager
def head_only_at(model, slots: torch.Tensor):
    """Run the LM head only at `slots` [N], flat indices into the [R, W] rows.

    A pre-hook swaps the head's input [R, W, H] for [1, N, H], so logits come out
    [1, N, V] instead of [R, W, V]; the model's own logit post-processing (scaling,
    soft-capping) still runs on them.
    """
    def keep(module, args):
        hidden = args[0]  # [R, W, H]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, slots.to(hidden.device))[None],) + args[1:]

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def packed_forward(model, packed: PackedBatch, slots: torch.Tensor):
    """Run the packed rows; returns (logits [N, V] at flat `slots` [N], packed cache)."""
    device = model.device
    with head_only_at(model, slots):
        out = model(
            input_ids=packed.input_ids.to(device),  # [R, W]
            position_ids=packed.position_ids.to(device),  # [R, W]
            attention_mask=masks.for_model(model, packed.segment_ids.to(device)),  # [R, 1, W, W]
            past_key_values=DynamicCache(),  # plain layers: a sliding layer would drop other prompts' keys
            use_cache=True,
        )
    return out.logits[0], out.past_key_values


def last_token_logits(model, packed: PackedBatch):
    """Per-prompt next-token logits [P, V] (fp32) and the packed cache."""
    row, col = packed.last_index
    logits, cache = packed_forward(model, packed, row * packed.width + col)
    return logits.float(), cache
