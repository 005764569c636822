"""Run a group that may fail: halve it until the failure is one row's (no Ray import).

    results = run_splitting(lambda rows: task.run(runner, rows), rows, cost, before)
    # one entry per row: its result, or the exception of a row that fails even alone
    # (out of memory -> an `out_of_memory` row, anything else -> an `engine_error` row)

Outputs do not depend on how rows are grouped (packed prefill equals each prompt alone;
per-row seeds), so a split group gives the same rows, and one bad prompt marks only itself.
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


def run_splitting(run: Callable[[list], list], items: Sequence, cost: Callable[[list], int] = len,
                  before: Callable[[int], None] | None = None) -> list:
    """run(items) -> results; on any exception run each half, down to single items.

    `before(cost(items))` runs before every attempt (the fault-injection hook). A single
    item that still fails returns its exception in place of a result.
    """
    items = list(items)
    if not items:
        return []
    try:
        if before is not None:
            before(cost(items))
        return list(run(items))
    except Exception as e:  # noqa: BLE001 - the caller turns a lone failure into an error row
        if is_oom(e):
            _free_cache()
        if len(items) == 1:
            return [e]
    mid = len(items) // 2
    return run_splitting(run, items[:mid], cost, before) + run_splitting(run, items[mid:], cost, before)


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
                            max_group_prompts: int, max_new_tokens: int, kv_copies: int = 2,
                            running: int | None = None) -> int:
    """Prompt tokens per group that fit a per-actor memory budget (besides the weights).

    Generation: a group of T prompt tokens needs T x (2 x kv + act) in prefill (the packed
    cache plus its per-prompt copy, and activations); `running` sequences decode at once
    (default max_group_prompts: one group), holding the caches of G = ceil(running /
    max_group_prompts) groups' prompts, each growing by up to max_new_tokens x kv. So
        max_group_tokens = (budget - running x max_new_tokens x kv) / ((1 + G) x kv + act)
    Scoring keeps no cache (kv_copies=0, max_new_tokens=0): budget / act.
    Raises ValueError when the budget does not even cover decoding.
    """
    kv, act = bytes_per_token(model_config, dtype_bytes)
    running = running or max_group_prompts
    # other groups' prompt caches decoding beside this group's (none when scoring: no cache)
    others = -(-running // max_group_prompts) - 1 if kv_copies else 0
    budget = memory_budget_gb * 1024 ** 3
    decode = running * max_new_tokens * kv
    tokens = int((budget - decode) // ((kv_copies + others) * kv + act))
    if tokens < 1:
        raise ValueError(f"packing.memory_budget_gb={memory_budget_gb} is too small: decoding {running} "
                         f"prompts x {max_new_tokens} new tokens alone needs {decode / 1024 ** 3:.3f} GB")
    return tokens
