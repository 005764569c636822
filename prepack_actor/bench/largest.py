"""GPU only: the largest batch each method runs without OOM under the same memory cap.

The cap is `torch.cuda.set_per_process_memory_fraction`, the same for every method, so
the result does not depend on the card's size (the paper's "16x larger batches").
Batch sizes double from `start` until the first OOM, then a binary search between the
last fit and the first failure. Prompts are drawn with a fixed seed.
"""
from __future__ import annotations

import torch

from ..core.forward import enable_varlen
from .methods import VARLEN_METHODS, capacity_rule, prefill_once


def _fits(model, token_ids, batch_size: int, pad_id: int, rule, seed: int, varlen: bool = False) -> bool:
    g = torch.Generator().manual_seed(seed)
    prompts = [token_ids[i] for i in torch.randint(len(token_ids), (batch_size,), generator=g).tolist()]
    try:
        prefill_once(model, prompts, pad_id, rule, varlen)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(model, token_ids: list[list[int]], method: str, pad_id: int, memory_gb: float,
                  limit: int, best_multiple: float, best_min_width: int, seed: int = 0, start: int = 8) -> dict:
    device = model.device
    assert device.type == "cuda", "largest_batch needs a CUDA device"
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, memory_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    rule = capacity_rule(method, best_multiple, best_min_width)
    varlen = method in VARLEN_METHODS and enable_varlen(model)
    try:
        lo, hi = 0, None  # lo fits, hi fails
        b = start
        while b <= limit:
            if _fits(model, token_ids, b, pad_id, rule, seed, varlen):
                lo, b = b, b * 2
            else:
                hi = b
                break
        if hi is None:
            return {"method": method, "largest_batch": lo, "hit_limit": True, "memory_gb": memory_gb}
        while hi - lo > max(1, lo // 16):  # within ~6%
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(model, token_ids, mid, pad_id, rule, seed, varlen) else (lo, mid)
        return {"method": method, "largest_batch": lo, "hit_limit": False, "memory_gb": memory_gb}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
