"""Prefill time of full batching vs prepacking on a handful of prompts (for notebooks).

    rows = compare_prefill(model, ids, pad_id, batch_size=16, repeats=5)
    rows[0].method, rows[0].median_s, rows[0].num_slots

A small front over the benchmark's measuring code (`bench.methods.prefill_runner`,
`bench.measure.interleaved`): both methods run the same seeded random batches (the
paper's full batching), interleaved, after one warm-up round; prefill_s counts what a
method needs before decoding can start (packing, forward and cache split for prepacking;
padding and forward for full batching).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .baselines import random_batches
from .measure import interleaved
from .methods import capacity, capacity_rule, prefill_runner
from ..core.packing import pack

METHODS = {"full batching": "full_batching", "prepacking": "prepacking"}  # label -> bench method


@dataclass
class PrefillTiming:
    method: str  # "full batching" | "prepacking"
    median_s: float  # median over repeats of the mean prefill time per batch
    runs_s: list[float]  # that mean, per repeat
    rows_per_batch: float  # rows each forward pass ran (batch size for full batching)
    num_tokens: int  # real prompt tokens over all batches
    num_slots: int  # token slots the forward passes computed (real + pad)
    num_batches: int


def _rule(method: str):
    """Row sizing for a bench method: rows as wide as the longest prompt (the paper); None = padded."""
    return capacity_rule(method, 1.0, 0)


def _slots(method: str, batch: list[list[int]]) -> int:
    rule = _rule(method)
    if rule is None:
        return len(batch) * max(map(len, batch))
    return pack(batch, capacity(rule, [len(p) for p in batch])).input_ids.numel()


def compare_prefill(model, prompts: list[list[int]], pad_id: int, batch_size: int = 16, repeats: int = 5,
                    seed: int = 0) -> list[PrefillTiming]:
    """One PrefillTiming per method (METHODS order) for prefilling `prompts` (token ids)."""
    assert prompts and batch_size >= 1 and repeats >= 1
    batches = [[prompts[i] for i in b] for b in random_batches(len(prompts), batch_size, seed)]
    runners = {m: prefill_runner(model, batches, pad_id, _rule(m)) for m in METHODS.values()}
    runs = interleaved(runners, repeats=repeats, warmup=1)
    out = []
    for label, m in METHODS.items():
        times = [r["prefill_s"] for r in runs[m]]
        out.append(PrefillTiming(method=label, median_s=statistics.median(times), runs_s=times,
                                 rows_per_batch=statistics.mean(r["rows"] for r in runs[m]),
                                 num_tokens=sum(map(len, prompts)),
                                 num_slots=sum(_slots(m, b) for b in batches), num_batches=len(batches)))
    return out
