"""Tree-shaped attention masks for packed scoring rows, as small pure functions.

A packed scoring row holds units side by side. A unit is a prompt followed by one or
more branches (the choices): branch 0 is the prompt, branch j >= 1 is choice j-1, and
each branch's positions continue from the prompt's length. Query q may see key k when

    same unit  and  (k is a prompt token or k is on q's branch)  and  pos[k] <= pos[q]

which is block-diagonal causal when every unit has a single branch (the paper's
layout), and the prompt-shared tree when a unit has several. Causality is by position,
not by column, because sibling branches reuse the same positions. Pad slots (unit -1,
branch 0, position 0) only see each other, so no query row is all-masked (NaN in sdpa).
"""
from __future__ import annotations

import torch

from .masks import additive


def tree_causal(unit_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor,
                sliding_window: int | None = None) -> torch.Tensor:
    """[R, W] each -> bool mask [R, 1, W, W], True where query q may attend key k."""
    q_pos, k_pos = position_ids[:, :, None], position_ids[:, None, :]  # [R, W, 1], [R, 1, W]
    same_unit = unit_ids[:, :, None] == unit_ids[:, None, :]  # [R, W, W]
    k_branch = branch_ids[:, None, :]  # [R, 1, W]
    on_path = (k_branch == 0) | (k_branch == branch_ids[:, :, None])  # [R, W, W]
    allowed = same_unit & on_path & (k_pos <= q_pos)
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    return allowed[:, None]


def dense_reference(unit_ids: list[int], branch_ids: list[int], position_ids: list[int]) -> torch.Tensor:
    """The same predicate with Python loops over one row, for tests: [W, W] bool."""
    w = len(unit_ids)
    out = torch.zeros((w, w), dtype=torch.bool)
    for q in range(w):
        for k in range(w):
            out[q, k] = (unit_ids[q] == unit_ids[k] and branch_ids[k] in (0, branch_ids[q])
                         and position_ids[k] <= position_ids[q])
    return out


def for_model(model, unit_ids: torch.Tensor, branch_ids: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tree mask in the form the model's attention expects (as `masks.for_model`).

    sdpa takes the bool mask; eager adds the mask to the scores, so it gets 0 / dtype min.
    Models that mix full and sliding-window layers (layer_types) take one mask per type.
    """
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)

    def build(w: int | None) -> torch.Tensor:
        mask = tree_causal(unit_ids, branch_ids, position_ids, w)
        return mask if cfg._attn_implementation == "sdpa" else additive(mask, model.dtype)

    if layer_types:
        return {t: build(window if t == "sliding_attention" else None) for t in set(layer_types)}
    return build(window)
