"""Split a packed KV cache into one left-padded batched cache, a row per prompt.

Left padding is the layout `generate` uses, so decoding continues with a 2D attention
mask and explicit positions, and the model code needs nothing special.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .packing import PackedBatch


@torch.inference_mode()
def unpack(cache: DynamicCache, packed: PackedBatch) -> tuple[DynamicCache, torch.Tensor]:
    """Packed cache [R, H, W, D] per layer -> (cache [P, H, Lmax, D], attention_mask [P, Lmax])."""
    device = cache.layers[0].keys.device
    length = packed.length.to(device)  # [P]
    lmax = int(length.max())
    j = torch.arange(lmax, device=device)[None, :]  # [1, Lmax]
    start = lmax - length[:, None]  # [P, 1] first real slot after the left pad
    valid = j >= start  # [P, Lmax]
    col = (packed.offset.to(device)[:, None] + j - start).clamp(min=0)  # [P, Lmax]
    # Flat slot index into [R * W]; pad slots read a real key and are masked later.
    flat = (packed.row.to(device)[:, None] * packed.width + col).reshape(-1)  # [P * Lmax]
    pairs = []
    for layer in cache.layers:
        pairs.append(tuple(_gather(t, flat, len(length), lmax) for t in (layer.keys, layer.values)))
    # No config: plain layers for every layer. The sliding window (if any) is applied by the
    # model's mask over positions, as it is for `generate` with left padding.
    return DynamicCache(pairs), valid.long()


def _gather(t: torch.Tensor, flat: torch.Tensor, p: int, lmax: int) -> torch.Tensor:
    """[R, H, W, D] -> [P, H, Lmax, D] by slot index."""
    r, h, w, d = t.shape
    slots = t.transpose(1, 2).reshape(r * w, h, d)  # [R * W, H, D]
    return slots.index_select(0, flat).view(p, lmax, h, d).transpose(1, 2)


def select(cache: DynamicCache, keep: torch.Tensor, start: int = 0) -> None:
    """Keep batch rows `keep` [A] and drop the first `start` columns, in place.

    Called when prompts finish (rows) and when the remaining prompts' left pad
    shrinks (columns), so finished work stops costing compute.
    """
    for layer in cache.layers:
        layer.keys = layer.keys[keep, :, start:]
        layer.values = layer.values[keep, :, start:]
