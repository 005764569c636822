"""Decode attention over a BlockCache: each sequence's query against its own real keys only.

Called by the registered prepack_varlen attention function when the model call carries
`block_decode=cache` (core/attention.py), so a model needs nothing special. GQA native,
sliding windows (keys at positions > p - window for the query at p). Soft-capping and sinks
are refused upstream (forward.varlen_refusal): those models decode on the left-padded path.

Kernels (docs/decode.md has the measurements):
  cpu "bucket" rows sorted by key count and cut into buckets whose padding stays within
               TOLERANCE of their real keys; one sdpa per bucket over keys gathered by block
               table (padding masked). Default.
  cpu "flat"   every real key once in one stream, per-sequence softmax by index_reduce /
               index_add; never pads, but materialises the query per key.
  cuda         torch.nn.attention.varlen.varlen_attn with block_table and seqused_k (paged
               flash decode). UNTESTED here: no GPU on this machine; guarded by query.is_cuda.
A plan (which slots each bucket reads) is built once per step and window and shared by
every layer of that window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_cache import BlockCache

TOLERANCE = 1.05  # a bucket reads at most this many keys per real key


@dataclass
class Bucket:
    rows: torch.Tensor | None  # [b] batch rows (None: all rows in batch order)
    slots: torch.Tensor  # [b, L] pool slots read (pad entries repeat a real key, masked)
    mask: torch.Tensor | None  # [b, 1, 1, L] bool, None when every row has L keys


@dataclass
class Plan:
    buckets: list[Bucket]
    seq: torch.Tensor  # [N] batch row of each real key (flat kernel)
    flat_slots: torch.Tensor  # [N] slot of each real key (flat kernel)
    read: int  # keys read by the bucket kernel (padding included)
    real: int  # real keys


def plan(cache: BlockCache, window: int | None) -> Plan:
    """The step's read plan for layers with `window` (None = full attention); cached per step."""
    if window in cache.plans:
        return cache.plans[window]
    device = cache.layers[0].keys.device
    bs = cache.block_size
    kv = [n + 1 for n in cache.lengths]  # keys per row this step, the new token included
    start = [max(0, n - window) if window else 0 for n in kv]
    count = [n - s for n, s in zip(kv, start)]
    table = torch.tensor([t + [0] * (max(map(len, cache.tables)) - len(t)) for t in cache.tables])  # [B, blocks]

    def slots_of(rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.tensor(rows)
        first, n = torch.tensor([start[i] for i in rows]), torch.tensor([count[i] for i in rows])
        j = torch.arange(width)[None, :]  # [1, L]
        pos = first[:, None] + torch.minimum(j, n[:, None] - 1)  # [b, L] pad repeats the last key
        return table[r[:, None], pos // bs] * bs + pos % bs, j < n[:, None]

    order = sorted(range(len(kv)), key=count.__getitem__, reverse=True)
    buckets, read, i = [], 0, 0
    while i < len(order):
        top, j = count[order[i]], i
        while j < len(order) and count[order[j]] * TOLERANCE >= top:
            j += 1
        rows = order[i:j]
        slots, valid = slots_of(rows, top)
        whole = len(rows) == len(order)
        buckets.append(Bucket(None if whole and rows == sorted(rows) else torch.tensor(rows, device=device),
                              slots.to(device), None if bool(valid.all()) else valid[:, None, None, :].to(device)))
        read += len(rows) * top
        i = j
    seq = torch.repeat_interleave(torch.arange(len(kv)), torch.tensor(count))
    all_slots, valid = slots_of(list(range(len(kv))), max(count))
    p = Plan(buckets, seq.to(device), all_slots[valid].to(device), read, sum(count))
    cache.plans[window] = p
    return p


def attend(module, query: torch.Tensor, cache: BlockCache, scale: float, window: int | None) -> torch.Tensor:
    """query [B, H, 1, D] -> out [B, 1, H, D] over the keys of each row in `cache` (layer module.layer_idx)."""
    layer = cache.layers[module.layer_idx]
    if query.is_cuda:
        return _cuda(query, layer, cache, scale, window)
    p = plan(cache, window)
    cache.keys_read += p.read if cache.kernel == "bucket" else p.real
    cache.keys_real += p.real
    k, v = layer.flat()  # [slots, Hkv, D]
    return CPU[cache.kernel](query, k, v, p, scale).transpose(1, 2)


def _bucket(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, H, 1, D]: one sdpa per bucket of rows with about as many keys."""
    gqa = k.shape[1] != q.shape[1]
    out = q if len(p.buckets) == 1 and p.buckets[0].rows is None else torch.empty_like(q)
    for b in p.buckets:
        kb = k[b.slots].transpose(1, 2)  # [b, Hkv, L, D]
        vb = v[b.slots].transpose(1, 2)
        qb = q if b.rows is None else q.index_select(0, b.rows)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, scale=scale, enable_gqa=gqa)
        if b.rows is None:
            return o
        out.index_copy_(0, b.rows, o)
    return out


def _flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, H, 1, D]: every real key once, softmax per sequence by index ops."""
    bsz, h, _, d = q.shape
    hkv = k.shape[1]
    kt, vt = k[p.flat_slots], v[p.flat_slots]  # [N, Hkv, D]
    qg = q.view(bsz, hkv, h // hkv, d)  # [B, Hkv, G, D]
    s = torch.einsum("nhgd,nhd->nhg", qg[p.seq], kt) * scale  # [N, Hkv, G]
    m = s.new_full((bsz,) + s.shape[1:], float("-inf")).index_reduce_(0, p.seq, s, "amax")  # [B, Hkv, G]
    e = (s - m[p.seq]).exp()
    den = torch.zeros_like(m).index_add_(0, p.seq, e)
    out = q.new_zeros(bsz, hkv, h // hkv, d).index_add_(0, p.seq, e[..., None] * vt[:, :, None])
    return (out / den[..., None]).view(bsz, h, 1, d)


CPU = {"bucket": _bucket, "flat": _flat}


def _cuda(query, layer, cache: BlockCache, scale: float, window: int | None) -> torch.Tensor:
    """UNTESTED (no GPU here): paged flash decode, query [B, H, 1, D] -> [B, 1, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, _, d = query.shape
    kv = torch.tensor([n + 1 for n in cache.lengths], dtype=torch.int32, device=query.device)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=query.device)
    cu_k = torch.nn.functional.pad(kv.cumsum(0, dtype=torch.int32), (1, 0))
    out = varlen_attn(query[:, :, 0].contiguous(), layer.keys, layer.values, cu_q, cu_k, 1, int(kv.max()),
                      scale=scale, window_size=(-1, 0) if window is None else (window - 1, 0),
                      enable_gqa=layer.keys.shape[2] != h, seqused_k=kv, block_table=cache.table_tensor())
    return out.view(b, 1, h, d)
