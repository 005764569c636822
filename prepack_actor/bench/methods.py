"""The methods compared, each as a runner over the same token-id batches.

Prefill methods (one forward pass per batch, up to each prompt's first token):
- full_batching: left-padded to the batch's longest prompt (Hugging Face).
- length_ordered: the same, on batches cut after sorting the sample by length.
- prepacking: FFD into rows of the batch's longest prompt (the paper), one packed
  forward, the cache split into a left-padded per-prompt cache.
- prepacking_best: the same with rows max(`multiple` x the longest prompt, `min_width`)
  tokens wide: fewer, wider rows (a token budget per row).
- prepacking_varlen: the batch as ONE stream (no padding) on varlen attention
  (core/attention.py): no dense mask, each prompt's own query-key pairs only.
prefill_s counts everything a method needs before decoding can start: packing, mask,
forward and the cache split for prepacking; padding and forward for the baselines.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core import kv_cache, masks
from .baselines import padded_prefill
from ..core.packing import pack
from ..core.forward import enable_varlen, last_token_logits
from .measure import Clock, PeakMemory

WARM_PROMPTS = 4  # a warm-up round runs the first batch's first few prompts only


Capacity = tuple[float, int]  # (multiple of the longest prompt, minimum row width)
STREAM: Capacity = (float(2 ** 20), 0)  # wider than any batch: one row, i.e. one stream
VARLEN_METHODS = ("prepacking_varlen",)


def capacity_rule(method: str, best_multiple: float, best_min_width: int) -> Capacity | None:
    """How a method sizes its packed rows; None for the padded methods."""
    return {"prepacking": (1.0, 0), "prepacking_best": (best_multiple, best_min_width),
            "prepacking_varlen": STREAM}.get(method)


def capacity(rule: Capacity, lengths: list[int]) -> int:
    multiple, min_width = rule
    return max(int(multiple * max(lengths)), min_width)


def prefill_once(model, prompts: list[list[int]], pad_id: int, rule: Capacity | None, varlen: bool = False) -> dict:
    """One batch, timed on the device clock; returns seconds, rows and peak memory.

    varlen: the batch as one stream on varlen attention (model switched by enable_varlen).
    """
    device = model.device
    clock = Clock(device)
    with PeakMemory(device) as mem:
        if rule is None:
            clock.mark()
            clock.mark()  # no packing
            logits, cache = padded_prefill(model, prompts, pad_id)
            clock.mark()
            clock.mark()  # no split
            rows = len(prompts)
        else:
            clock.mark()
            packed = pack(prompts, capacity(rule, [len(p) for p in prompts]), pad_id, stream=varlen)
            clock.mark()
            logits, cache = last_token_logits(model, packed, varlen=varlen)
            clock.mark()
            cache, _ = kv_cache.unpack(cache, packed)
            clock.mark()
            rows = packed.num_rows
        first = logits.argmax(-1)  # greedy first token
        clock.mark()
        del logits, cache, first
    pack_s, forward_s, split_s, sample_s = clock.seconds()
    out = {"prefill_s": pack_s + forward_s + split_s, "ttft_s": pack_s + forward_s + split_s + sample_s,
           "pack_s": pack_s, "split_s": split_s, "mask_s": 0.0, "rows": rows,
           "peak_memory_bytes": mem.bytes, "memory_source": mem.source}
    if rule is not None and not varlen:  # the mask is built inside the forward; time the same build alone
        clock = Clock(device)
        clock.mark()
        m = masks.for_model(model, packed)
        clock.mark()
        del m
        out["mask_s"] = clock.seconds()[0]
    return out


def prefill_runner(model, batches: list[list[list[int]]], pad_id: int,
                   rule: Capacity | None, varlen: bool = False) -> Callable[[bool], dict]:
    """A runner for `measure.interleaved`: all batches once; per-batch means, peak = max."""
    if varlen and not enable_varlen(model):
        raise ValueError("prepacking_varlen: this model cannot run varlen attention "
                         "(see prepack_actor.core.forward.varlen_refusal)")

    def run(warm: bool) -> dict:
        todo = [batches[0][:WARM_PROMPTS]] if warm else batches
        per = [prefill_once(model, b, pad_id, rule, varlen) for b in todo]
        k = len(per)
        agg = {key: sum(p[key] for p in per) / k
               for key in ("prefill_s", "ttft_s", "pack_s", "mask_s", "split_s", "rows")}
        agg["peak_memory_bytes"] = max(p["peak_memory_bytes"] for p in per)
        agg["memory_source"] = per[0]["memory_source"]
        agg["overhead_share"] = (agg["pack_s"] + agg["mask_s"] + agg["split_s"]) / agg["prefill_s"]
        return agg

    return run
