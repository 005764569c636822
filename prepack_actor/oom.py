"""Run a group that may not fit in memory: halve it on out-of-memory (no Ray import).

    results = generate_splitting(engine.generate_group, ids, params)
    # one entry per prompt: a GenerationResult, or the OOM error of a prompt that does not
    # fit even alone (the caller turns it into an `out_of_memory` error row)

Outputs do not depend on how prompts are grouped (packed prefill equals each prompt
alone; per-row seeds), so a split group gives the same rows.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA and others), or a CPU allocator RuntimeError."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or any(m in str(e).lower() for m in OOM_MESSAGES))


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_splitting(generate: Callable, ids: Sequence[list[int]], params: Sequence,
                       before: Callable[[int], None] | None = None) -> list:
    """generate(ids, params) -> results; on OOM retry each half, down to single prompts.

    `before(num_tokens)` runs before every attempt (the fault-injection hook).
    """
    try:
        if before is not None:
            before(sum(len(x) for x in ids))
        return list(generate(list(ids), list(params)))
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_oom(e):
            raise
        _free_cache()
        if len(ids) == 1:
            return [e]
    mid = len(ids) // 2
    return (generate_splitting(generate, ids[:mid], params[:mid], before)
            + generate_splitting(generate, ids[mid:], params[mid:], before))


def bytes_per_token(model_config, dtype_bytes: int) -> tuple[int, int]:
    """(KV cache bytes, peak prefill activation bytes) per token for a transformers config.

    kv  = 2 (K and V) x layers x kv_heads x head_dim x dtype_bytes
    act = (4 x hidden + 2 x intermediate) x dtype_bytes   (one layer at a time: residual,
          q/k/v/o projections, the MLP's up and gate outputs)
    """
    c = model_config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return kv, (4 * c.hidden_size + 2 * inter) * dtype_bytes


def token_budget_for_memory(model_config, memory_budget_gb: float, dtype_bytes: int,
                            max_rows: int, max_new_tokens: int) -> int:
    """Prompt tokens per group that fit a per-actor memory budget (besides the weights).

    A group of T prompt tokens needs T x (2 x kv + act) in prefill (the packed cache plus
    its per-prompt copy, and activations) and, while decoding, its prompts' caches grow
    by up to max_rows x max_new_tokens x kv. So
        token_budget = (budget - max_rows x max_new_tokens x kv) / (2 x kv + act)
    Raises ValueError when the budget does not even cover decoding.
    """
    kv, act = bytes_per_token(model_config, dtype_bytes)
    budget = memory_budget_gb * 1024 ** 3
    tokens = int((budget - max_rows * max_new_tokens * kv) // (2 * kv + act))
    if tokens < 1:
        raise ValueError(f"packing.memory_budget_gb={memory_budget_gb} is too small: decoding {max_rows} rows x "
                         f"{max_new_tokens} new tokens alone needs {max_rows * max_new_tokens * kv / 1024 ** 3:.3f} GB")
    return tokens
