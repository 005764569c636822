"""Split a packed KV cache into one left-padded batched cache, a row per prompt.

Left padding is the layout `generate` uses, so decoding continues with a 2D attention
mask and explicit positions, and the model code needs nothing special. Each layer lives
in a buffer with room for the new tokens: a decode step writes one column in place
instead of `torch.cat`-copying the whole cache as `DynamicLayer` does.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .compile import opaque_cache
from .packing import PackedBatch


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a preallocated [B, H, capacity, D] buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        b, h, n, d = keys.shape
        self.buf_k = keys.new_empty(b, h, n + room, d)
        self.buf_v = values.new_empty(b, h, n + room, values.shape[-1])
        self.buf_k[:, :, :n] = keys
        self.buf_v[:, :, :n] = values
        self.n = n  # columns in use
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self.buf_k[:, :, : self.n], self.buf_v[:, :, : self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        if self.n + q > self.buf_k.shape[-2]:  # out of room: grow by doubling
            grow = max(q, self.buf_k.shape[-2])
            self.buf_k = torch.cat([self.buf_k, self.buf_k.new_empty(*self.buf_k.shape[:2], grow, self.buf_k.shape[3])], 2)
            self.buf_v = torch.cat([self.buf_v, self.buf_v.new_empty(*self.buf_v.shape[:2], grow, self.buf_v.shape[3])], 2)
        self.buf_k[:, :, self.n: self.n + q] = key_states
        self.buf_v[:, :, self.n: self.n + q] = value_states
        self.n += q
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def select(self, keep: torch.Tensor, start: int) -> None:
        """Keep batch rows `keep` and drop the first `start` columns (a copy; prompts finished)."""
        self.buf_k, self.buf_v = self.buf_k[keep, :, start:], self.buf_v[keep, :, start:]
        self.n -= start
        self._view()


@torch.inference_mode()
def unpack(cache: DynamicCache, packed: PackedBatch, room: int = 0,
           index: torch.Tensor | None = None) -> tuple[DynamicCache, torch.Tensor]:
    """Packed cache [R, H, W, D] per layer -> (cache [S, H, Lmax, D], attention_mask [S, Lmax]).

    `room`: decode steps to preallocate. `index` [S]: the prompt of each output row, so a
    prompt sampled n times gets n rows (copies of its keys/values); None = one row per
    prompt (S = P). Consumes `cache`: each packed layer is freed as soon as it is split, so
    the peak holds one packed layer, not all of them.
    """
    device = cache.layers[0].keys.device
    length, row, offset = packed.length, packed.row, packed.offset  # [P] each
    if index is not None:
        length, row, offset = length[index], row[index], offset[index]  # [S] each
    length = length.to(device)
    lmax = int(length.max())
    j = torch.arange(lmax, device=device)[None, :]  # [1, Lmax]
    start = lmax - length[:, None]  # [S, 1] first real slot after the left pad
    valid = j >= start  # [S, Lmax]
    col = (offset.to(device)[:, None] + j - start).clamp(min=0)  # [S, Lmax]
    # Flat slot index into [R * W]; pad slots read a real key and are masked later.
    flat = (row.to(device)[:, None] * packed.width + col).reshape(-1)  # [S * Lmax]
    layers = []
    for layer in cache.layers:
        k, v = (_gather(t, flat, len(length), lmax) for t in (layer.keys, layer.values))
        layer.keys = layer.values = None
        layers.append(BufferedLayer(k, v, room))
    # Plain (non-sliding) layers throughout: a sliding window, if any, is applied by the
    # model's mask over positions, as it is for `generate` with left padding.
    out = opaque_cache(DynamicCache())  # eager updates inside compiled layers
    out.layers = layers
    return out, valid.long()


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
        layer.select(keep, start)
