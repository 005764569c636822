"""Entry-point routing for models that are not on the plain packed path (see capability.py).

    PACKED_BUCKETED: prompts split into buckets (capability.buckets), each bucket on the
      normal packed path with its width limit; prompts that must run alone go unpacked.
    UNPACKED: the whole call through unpacked.py (HF generate, padded or one by one).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch

from . import unpacked
from .capability import PACKED_BUCKETED, UNPACKED, buckets, width_limit
from .core.sampling import SamplingParams


@contextmanager
def limited(engine, limit: int | None):
    """The engine packs no more than `limit` columns per pass (row width and stream length) inside the block."""
    config = engine.config
    if limit is not None:
        cap = config.pack_capacity
        engine.config = replace(config, pack_capacity=min(cap, limit) if cap else None,
                                max_group_tokens=min(config.max_group_tokens, limit))
    try:
        yield
    finally:
        engine.config = config


def generate(engine, ids: list[list[int]], params: list[SamplingParams]) -> list:
    cap = engine.capability
    if cap.route == UNPACKED:
        return unpacked.generate(engine, ids, params, cap.padded)
    assert cap.route == PACKED_BUCKETED, cap
    lengths = [len(x) for x in ids]
    packs, alone = buckets(cap, lengths, [p.max_new_tokens for p in params])
    results: list = [None] * len(ids)
    for bucket in packs:
        with limited(engine, width_limit(cap, [lengths[i] for i in bucket])):
            for i, r in zip(bucket, engine.generate_packed([ids[i] for i in bucket], [params[i] for i in bucket])):
                r.engine_path = PACKED_BUCKETED
                results[i] = r
    if alone:
        for i, r in zip(alone, unpacked.generate(engine, [ids[i] for i in alone], [params[i] for i in alone], False)):
            results[i] = r
    return results


def prefill(engine, ids: list[list[int]]) -> torch.Tensor:
    cap = engine.capability
    if cap.route == UNPACKED:
        return unpacked.prefill(engine, ids, cap.padded)
    lengths = [len(x) for x in ids]
    packs, alone = buckets(cap, lengths, [0] * len(ids))
    out = torch.empty(len(ids), engine.model.config.vocab_size)
    for bucket in packs:
        with limited(engine, width_limit(cap, [lengths[i] for i in bucket])):
            out[torch.tensor(bucket)] = engine.prefill_packed([ids[i] for i in bucket])
    if alone:
        out[torch.tensor(alone)] = unpacked.prefill(engine, [ids[i] for i in alone], False)
    return out
