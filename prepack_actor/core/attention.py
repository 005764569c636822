"""`prepack_varlen`: variable-length attention over packed prompts, for transformers' AttentionInterface.

Prompts lie end to end in one stream (or in packed rows) and their boundaries travel as
cumulative lengths (`cu_seq_lens_q/k`, as flash-attn varlen and nano-vllm keep them); no
[R, 1, W, W] mask is built, and the work is each prompt's own query-key pairs, not W x W.

    attention.register()                              # idempotent; models.py does it at import
    model.set_attn_implementation(attention.NAME)     # sdpa in every call without cu_seq_lens
    model(input_ids, position_ids=..., cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)

transformers 5 passes the extra model kwargs down to the attention function. A name that
is not in AttentionMaskInterface would get mask None and silently drop a 2D padding mask,
so a mask hook is registered under the same name: None for an unpadded prefill (the
function owns causality, windows and boundaries), the ordinary sdpa mask otherwise, and
the function then runs plain sdpa (left-padded decoding, the dense reference path).

Kernels (docs/varlen.md has the measurements):
  cpu "fused" one C++ call per layer for every prompt (core/cpu_prefill.cpp, built on first
              use by cpu_ops.py): scores a GEMM micro-kernel's way, exact fp32 softmax per
              row, windows, GQA native. Default; where it cannot serve (no compiler, fp16, a
              head dim not a multiple of 16) "loop" runs, or "block" under a sliding window.
  cpu "loop"  one sdpa(is_causal) per prompt on 4D views (CPU sdpa sends 3D inputs to its
              slow math kernel), GQA native; prompts longer than a sliding window in query
              tiles.
  cpu "block" the stream in fixed query blocks, each against the keys from its first
              prompt's start (window-clipped) with a small local mask (faster than the loop
              where a sliding window is active).
  cuda        torch.nn.attention.varlen.varlen_attn (flash, window_size for sliding layers).
              UNTESTED here: written from torch 2.13's varlen.py, no GPU on this machine.
Not implemented, so refused (never a silent difference): attention logit soft-capping,
attention sinks, bidirectional packed attention, a cache holding past tokens with cu_seq_lens.
"""
from __future__ import annotations

import contextlib
import contextvars

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import cpu_ops
from .compile import opaque

NAME = "prepack_varlen"
CPU_KERNELS = ("fused", "loop", "block")
KERNEL = "fused"  # the CPU prefill kernel (module default; benchmarks compare the others)
BLOCK_SIZE = 128  # query rows per block ("block" kernel) and per tile (long sliding prompts)


def register() -> str:
    """Register the attention function and its mask hook with transformers; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask: torch.Tensor | None = None, use_vmap: bool = False, **kwargs):
    """Mask hook: None for a prefill with no padding and no past, else transformers' sdpa mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    no_padding = attention_mask is None or bool(attention_mask.all())
    first = isinstance(q_offset, int) and q_offset == 0 and isinstance(kv_offset, int) and kv_offset == 0
    if no_padding and first and q_length == kv_length and not use_vmap:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, use_vmap=use_vmap, **kwargs)


# The BlockCache of the decode step in progress. A context variable, not a model kwarg:
# some decoder layers (nemotron, jetmoe, diffllama) drop **kwargs before attention.
_DECODING: contextvars.ContextVar = contextvars.ContextVar("prepack_block_decode", default=None)


@contextlib.contextmanager
def decoding(cache):
    """Attention calls inside read `cache`'s blocks (block_attention) instead of key/value."""
    token = _DECODING.set(cache)
    try:
        yield
    finally:
        _DECODING.reset(token)


@opaque  # loops over prompts in Python: eager inside compiled layers (core/compile.py)
def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, is_causal: bool | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, Tq, D], key/value [B, Hkv, Tk, D] -> (out [B, Tq, H, D], None).

    Inside `decoding(cache)` (a BlockCache): a decode step over paged blocks
    (block_attention.attend); key/value are then only the step's new token, already stored."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{NAME}: attention soft-capping / sinks are not implemented; use sdpa or eager")
    if dropout and module.training:
        raise NotImplementedError(f"{NAME}: inference only (dropout > 0 in training mode)")
    block_decode = _DECODING.get()
    if block_decode is not None:
        from . import block_attention
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return block_attention.attend(module, query, key, value, block_decode, scale, sliding_window), None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, h, tq, d = query.shape
    tk = key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5

    bounds = None
    if cu_seq_lens_q is not None:
        if attention_mask is not None:
            raise ValueError(f"{NAME}: got both cu_seq_lens and an attention mask")
        if tk != tq:
            raise NotImplementedError(f"{NAME}: the cache held {tk - tq} tokens already; varlen is prefill only")
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q \
                and not torch.equal(cu_seq_lens_k.to(cu_seq_lens_q.device), cu_seq_lens_q):
            raise NotImplementedError(f"{NAME}: cu_seq_lens_k != cu_seq_lens_q (prefill with no past only)")
        if not is_causal:
            raise NotImplementedError(f"{NAME}: packed bidirectional attention is not implemented")
        if query.is_cuda:  # boundaries stay on the device: no host sync
            assert max_length_q is not None, "max_length_q is needed with cu_seq_lens on CUDA"
            out = _cuda_varlen(_stream(query), _stream(key), _stream(value), cu_seq_lens_q, int(max_length_q),
                               scale, sliding_window)
            return out.view(b, tq, h, d), None
        bounds = tuple(int(x) for x in cu_seq_lens_q.tolist())
        if bounds[0] != 0 or bounds[-1] != b * tq:
            raise ValueError(f"{NAME}: cu_seq_lens must run from 0 to B*T={b * tq}, got {bounds[0]}..{bounds[-1]}")
    elif attention_mask is None and tq == tk and tq > 1 and is_causal:
        # The hook returned None: boundaries from the positions (rows of one sequence each
        # give exactly the row starts, and plain batched sdpa below).
        bounds = _bounds_from_positions(position_ids, b, tq)
        if bounds == tuple(range(0, b * tq + 1, tq)) and (sliding_window is None or sliding_window >= tq):
            bounds = None  # one causal sequence per row, no window that bites: plain batched sdpa

    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    window = sliding_window if sliding_window is not None and sliding_window < longest else None
    q, k, v = (_stream(x) for x in (query, key, value))  # [H*, B*T, D]
    return CPU[KERNEL](q, k, v, bounds, scale, window).view(b, tq, h, d), None


def _stream(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [H, B*T, D] (B rows end to end; a free view for B == 1)."""
    b, h, t, d = x.shape
    return x[0] if b == 1 else x.transpose(0, 1).reshape(h, b * t, d)


def _bounds_from_positions(position_ids: torch.Tensor | None, b: int, t: int) -> tuple[int, ...]:
    """Sequence starts over the B*T stream: row starts and every slot whose position does not continue."""
    if position_ids is None:
        return tuple(range(0, b * t + 1, t))
    pos = position_ids.expand(b, t).reshape(-1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start[::t] = True
    return tuple(torch.nonzero(start).flatten().tolist()) + (b * t,)


# CPU kernels: q [H, T, D], k/v [Hkv, T, D] views of the stream -> out [T, H, D].

@lru_cache(maxsize=256)
def _window_mask(lq: int, lk: int, window: int, device: str) -> torch.Tensor:
    """[Lq, Lk] bool, queries at key positions lk-lq .. lk-1: key j visible from query i when i - window < j <= i."""
    diff = torch.arange(lk - lq, lk, device=device)[:, None] - torch.arange(lk, device=device)[None, :]
    return (diff >= 0) & (diff < window)


def _sdpa_causal(q, k, v, scale: float, window: int | None):
    """One prompt [1, H*, L, D] -> [1, H, L, D]; longer than the window: query tiles against their own keys."""
    length = q.shape[-2]
    gqa = k.shape[-3] != q.shape[-3]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    tile = max(window, BLOCK_SIZE)
    out = torch.empty_like(q)
    for a in range(0, length, tile):
        e = min(a + tile, length)
        ks = max(0, a - window + 1)
        out[..., a:e, :] = F.scaled_dot_product_attention(
            q[..., a:e, :], k[..., ks:e, :], v[..., ks:e, :], attn_mask=_window_mask(e - a, e - ks, window, str(q.device)),
            scale=scale, enable_gqa=gqa)
    return out


def _loop(q, k, v, bounds: tuple[int, ...], scale: float, window: int | None):
    h, t, d = q.shape
    out = q.new_empty(t, h, d)
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = _sdpa_causal(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], scale, window)[0].transpose(0, 1)
    return out


@lru_cache(maxsize=64)
def _blocks(bounds: tuple[int, ...], window: int | None, block: int, device: str):
    """Per query block [a, e): (a, e, first key ks, bool mask [e-a, e-ks], or None when plain causal)."""
    t = bounds[-1]
    starts = torch.tensor(bounds[:-1])
    seg = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(bounds[1:]) - starts)  # [T]
    out = []
    for a in range(0, t, block):
        e = min(a + block, t)
        ks = int(starts[seg[a]])
        if window is not None:
            ks = max(ks, a - window + 1)
        qi, ki = torch.arange(a, e)[:, None], torch.arange(ks, e)[None, :]
        allowed = (seg[a:e, None] == seg[None, ks:e]) & (ki <= qi)
        if window is not None:
            allowed &= qi - ki < window
        plain = ks == a and bool(seg[a] == seg[e - 1]) and (window is None or e - a <= window)
        out.append((a, e, ks, None if plain else allowed.to(device)))
    return out


def _block(q, k, v, bounds: tuple[int, ...], scale: float, window: int | None):
    h, t, d = q.shape
    gqa = k.shape[0] != h
    out = q.new_empty(t, h, d)
    for a, e, ks, mask in _blocks(bounds, window, BLOCK_SIZE, str(q.device)):
        if mask is None:
            o = F.scaled_dot_product_attention(q[None, :, a:e], k[None, :, a:e], v[None, :, a:e], is_causal=True,
                                               scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q[None, :, a:e], k[None, :, ks:e], v[None, :, ks:e], attn_mask=mask,
                                               scale=scale, enable_gqa=gqa)
        out[a:e] = o[0].transpose(0, 1)
    return out


@lru_cache(maxsize=64)
def _bounds_tensor(bounds: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int64)


def _fused(q, k, v, bounds: tuple[int, ...], scale: float, window: int | None):
    """Every prompt in one call of the C++ kernel (cpu_prefill.cpp); where it cannot serve, the loop or block kernel."""
    if cpu_ops.attention_refusal(q, k) is not None:
        return (_block if window is not None else _loop)(q, k, v, bounds, scale, window)
    return cpu_ops.ops().prefill_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           _bounds_tensor(bounds), scale, window or 0)


CPU = {"fused": _fused, "loop": _loop, "block": _block}


def _cuda_varlen(q, k, v, cu: torch.Tensor, max_len: int, scale: float, window: int | None):
    """UNTESTED (no GPU here). q [H, T, D], k/v [Hkv, T, D], cu [S+1] -> [T, H, D] via flash varlen."""
    from torch.nn.attention.varlen import varlen_attn

    qt, kt, vt = (x.transpose(0, 1).contiguous() for x in (q, k, v))  # flash wants [T, H, D], unit stride on D
    cu = cu.to(device=q.device, dtype=torch.int32)
    # Flash window bounds are inclusive: (W - 1, 0) is transformers' "q - W < k <= q"; (-1, 0) is plain causal.
    window_size = (-1, 0) if window is None else (window - 1, 0)
    return varlen_attn(qt, kt, vt, cu, cu, max_len, max_len, scale=scale, window_size=window_size,
                       enable_gqa=q.shape[0] != k.shape[0])
