"""Decode attention over a BlockCache: each sequence's query against its own real keys only.

Called by the registered prepack_varlen attention function when the model call carries
`attention.decoding(cache)` (core/attention.py), so a model needs nothing special. GQA native,
sliding windows (keys at positions > p - window for the query at p). Soft-capping and sinks
are refused upstream (forward.varlen_refusal): those models decode on the left-padded path.

Kernels (docs/decode.md has the measurements):
  cpu "fused"  one C++ call per layer (core/cpu_decode.cpp, built on first use by cpu_ops.py): every row's
               query heads against its contiguous slot range (BlockCache reserves a run of
               blocks per sequence), fp32 softmax, no per-row dispatch. Default; where it cannot
               serve (no compiler, fp16, a head dim not a multiple of 16) the "loop" runs.
  cpu "loop"   per row two bmm over views of its slot range: reads exactly the real keys,
               copies nothing.
  cpu "bucket" rows sorted by key count and cut into buckets whose padding stays within
               TOLERANCE of their real keys; one sdpa per bucket over keys gathered by slot
               (padding masked). Fewer calls, but the gather copies every key once more.
  cuda         torch.nn.attention.varlen.varlen_attn with block_table and seqused_k (paged
               flash decode; blocks of a multiple of FLASH_PAGE tokens, else the "loop"
               kernel runs on the GPU). UNTESTED here: no GPU on this machine.
A plan is built once per step and window and shared by every layer of that window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_ops
from .block_cache import BlockCache, BlockDecodeUnsupported

TOLERANCE = 1.05  # a bucket reads at most this many keys per real key
FLASH_PAGE = 256  # flash attention's paged KV wants blocks of a multiple of 256 tokens (EngineConfig.block_size)


@dataclass
class Bucket:
    rows: torch.Tensor | None  # [b] batch rows (None: all rows, in batch order)
    slots: torch.Tensor  # [b, L] pool slots read (pad entries repeat a real key, masked)
    mask: torch.Tensor | None  # [b, 1, 1, L] bool, None when every row has L keys


@dataclass
class Plan:
    ranges: list[tuple[int, int]]  # per row: its keys as slots [start, end)
    read: int  # keys the kernel reads (padding included)
    real: int  # real keys
    buckets: list[Bucket] | None = None  # "bucket" kernel only
    bounds: torch.Tensor | None = None  # [B, 2] int64 ranges ("fused" kernel; built on its first layer)


def plan(cache: BlockCache, window: int | None, kernel: str) -> Plan:
    """The step's read plan for layers with `window` (None = full attention); cached per step."""
    if window in cache.plans:
        return cache.plans[window]
    ranges = cache.ranges(window)
    count = [e - s for s, e in ranges]
    p = Plan(ranges, sum(count), sum(count))
    if kernel == "bucket":
        p.buckets, p.read = _buckets(ranges, count, cache.layers[0].keys.device)
    cache.plans[window] = p
    cache.keys_read += p.read
    cache.keys_real += p.real
    return p


def _buckets(ranges, count, device) -> tuple[list[Bucket], int]:
    order = sorted(range(len(count)), key=count.__getitem__, reverse=True)
    buckets, read, i = [], 0, 0
    while i < len(order):
        top, j = count[order[i]], i
        while j < len(order) and count[order[j]] * TOLERANCE >= top:
            j += 1
        rows = order[i:j]
        first = torch.tensor([ranges[r][0] for r in rows])[:, None]
        n = torch.tensor([count[r] for r in rows])[:, None]
        col = torch.arange(top)[None, :]  # [1, L]
        slots = first + torch.minimum(col, n - 1)  # [b, L]; pad repeats the last key
        valid = col < n
        whole = len(rows) == len(order) and rows == sorted(rows)
        buckets.append(Bucket(None if whole else torch.tensor(rows, device=device), slots.to(device),
                              None if bool(valid.all()) else valid[:, None, None, :].to(device)))
        read += len(rows) * top
        i = j
    return buckets, read


def attend(module, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
           cache: BlockCache, scale: float, window: int | None) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, Hk, 1, D] (this step's, as the model passes them) -> out [B, 1, H, D]
    over the keys of each row in `cache` (layer module.layer_idx). key None: trust the cache's heads."""
    layer = cache.layers[module.layer_idx]
    cache.reads += 1
    if key is not None and module.layer_idx not in cache.head_orders:
        k, v = layer.flat()
        cache.head_orders[module.layer_idx] = head_order(key, value, k[cache.write_slots], v[cache.write_slots])
    order = cache.head_orders.get(module.layer_idx)  # key None: query heads map as enable_gqa
    if order is not None:  # query heads regrouped so enable_gqa's h // G mapping holds
        query = query[:, order]
    if query.is_cuda and cache.block_size % FLASH_PAGE == 0 and _varlen_attn() is not None:
        out = _cuda(query, layer, cache, scale, window)
    else:
        p = plan(cache, window, cache.kernel)  # CPU, or CUDA without paged flash (correct, slower)
        k, v = layer.flat()  # [slots, Hkv, D]
        out = CPU[cache.kernel](query, k, v, p, scale)
    return out if order is None else out[:, :, torch.argsort(order)]


def head_order(key: torch.Tensor, value: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Which cached kv head each query head reads, from the key/value the model passed
    ([B, Hk, 1, D]) and the same step's key/value in the cache (k, v [B, Hkv, D]). None: GQA as
    enable_gqa maps it (query head h reads kv head h // G); else a query-head order that makes
    it so (JetMoE tiles its kv heads with `repeat`: head h reads h % Hkv). A model that changes
    keys or values between the cache and attention (DiffLlama splits V) cannot read the blocks."""
    hk, hkv = key.shape[1], k.shape[1]
    kp, vp = key[:, :, 0], value[:, :, 0]  # [B, Hk, D]
    if hk % hkv == 0:
        r = hk // hkv
        if torch.equal(kp, k.repeat_interleave(r, 1)) and torch.equal(vp, v.repeat_interleave(r, 1)):
            return None
        if torch.equal(kp, k.repeat(1, r, 1)) and torch.equal(vp, v.repeat(1, r, 1)):
            return torch.argsort(torch.arange(hk, device=key.device) % hkv, stable=True)
    raise BlockDecodeUnsupported(f"block decode: the model passes attention keys/values other than the cached ones "
                                 f"({hkv} kv heads stored, {hk} passed); decoding on the left-padded cache")


def _loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, 1, H, D]: per row two small matmuls over views of its keys. A
    row's G query heads of one kv head form a [Hkv, G, D] block, so GQA reads each key once
    without repeating it; softmax in fp32 as HF's eager attention. Cheaper per row than an
    sdpa call, whose dispatch costs more than the work at decode sizes (docs/decode.md)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = (q * scale).reshape(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    kt, vt = k.permute(1, 2, 0), v.transpose(0, 1)  # [Hkv, D, slots], [Hkv, slots, D] (views)
    out = q.new_empty(b, hkv, h // hkv, d)
    fp32 = v.dtype == torch.float32
    # unbind once and write in place: ~5 calls a row instead of ~8 (dispatch is most of a short row's cost)
    for qi, oi, (s, e) in zip(qg.unbind(0), out.unbind(0), p.ranges):
        scores = torch.bmm(qi, kt[:, :, s:e])  # [Hkv, G, n]
        weights = scores.softmax(-1) if fp32 else scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        torch.bmm(weights, vt[:, s:e], out=oi)
    return out.view(b, 1, h, d)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, 1, H, D]: every row in one call of the C++ kernel (cpu_decode.cpp)."""
    if cpu_ops.attention_refusal(q, k) is not None:
        return _loop(q, k, v, p, scale)
    if p.bounds is None:
        p.bounds = torch.tensor(p.ranges, dtype=torch.int64).view(-1, 2)
    b, h, _, d = q.shape
    return cpu_ops.ops().decode_attention(q[:, :, 0].contiguous(), k, v, p.bounds, scale).view(b, 1, h, d)


def _bucket(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Plan, scale: float) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, 1, H, D]: one sdpa per bucket of rows with about as many keys."""
    gqa = k.shape[1] != q.shape[1]
    out = torch.empty_like(q)
    for b in p.buckets:
        kb, vb = k[b.slots].transpose(1, 2), v[b.slots].transpose(1, 2)  # [b, Hkv, L, D] (gathered)
        qb = q if b.rows is None else q.index_select(0, b.rows)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, scale=scale, enable_gqa=gqa)
        if b.rows is None:
            return o.transpose(1, 2)
        out.index_copy_(0, b.rows, o)
    return out.transpose(1, 2)


CPU = {"fused": _fused, "loop": _loop, "bucket": _bucket}


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _cuda(query, layer, cache: BlockCache, scale: float, window: int | None) -> torch.Tensor:
    """UNTESTED (no GPU here): paged flash decode, query [B, H, 1, D] -> [B, 1, H, D]."""
    varlen_attn = _varlen_attn()

    b, h, _, d = query.shape
    kv = torch.tensor([n + 1 for n in cache.lengths], dtype=torch.int32, device=query.device)  # [B]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=query.device)
    cu_k = torch.nn.functional.pad(kv.cumsum(0, dtype=torch.int32), (1, 0))
    out = varlen_attn(query[:, :, 0].contiguous(), layer.keys, layer.values, cu_q, cu_k, 1, int(kv.max()),
                      scale=scale, window_size=(-1, 0) if window is None else (window - 1, 0),
                      enable_gqa=layer.keys.shape[2] != h, seqused_k=kv, block_table=cache.table_tensor())
    return out.view(b, 1, h, d)
