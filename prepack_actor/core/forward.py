"""The packed forward pass: one model call over packed rows, the LM head only where needed."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from . import masks
from .packing import PackedBatch, branch_targets


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
def packed_forward(model, batch: PackedBatch, slots: torch.Tensor, use_cache: bool = True):
    """Run the packed rows; returns (logits [N, V] at flat `slots` [N], packed cache or None)."""
    device = model.device
    with head_only_at(model, slots):
        out = model(
            input_ids=batch.input_ids.to(device),  # [R, W]
            position_ids=batch.position_ids.to(device),  # [R, W]
            attention_mask=masks.for_model(model, batch),  # [R, 1, W, W]
            # plain layers: a sliding layer would drop other prompts' keys
            past_key_values=DynamicCache() if use_cache else None,
            use_cache=use_cache,
        )
    return out.logits[0], out.past_key_values if use_cache else None


def last_token_logits(model, batch: PackedBatch):
    """Per-prompt next-token logits [P, V] (fp32) and the packed cache."""
    row, col = batch.last_index
    logits, cache = packed_forward(model, batch, row * batch.width + col)
    return logits.float(), cache


@torch.inference_mode()
def branch_logprobs(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of every branch token given its prompt and branch so far (no cache).

    Returns (log-prob [T] fp32, the token is the argmax [T] bool, its branch [T]) on CPU.
    """
    slots, tokens, branch = branch_targets(batch)  # [T] each
    columns, inverse = torch.unique(slots, return_inverse=True)  # [C], [T]: siblings share a slot
    logits, _ = packed_forward(model, batch, columns, use_cache=False)  # [C, V]
    logits = logits.float()[inverse.to(logits.device)]  # [T, V]
    target = tokens.to(logits.device)[:, None]  # [T, 1]
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, target)[:, 0]  # [T]
    greedy = logits.argmax(-1) == target[:, 0]  # [T]
    return logprob.cpu(), greedy.cpu(), branch
