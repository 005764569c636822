"""Length-aware grouping: the one function that cuts work into forward-pass-sized groups.

The engine, the scorer and the job's grouping stage all call it. A group is bounded by
tokens (prefill memory) and by prompts (decode batch). Sorting longest first puts
neighbours in length together: packs fill well and decode lengths are alike.

    group_by_length([5, 900, 7, 880], max_group_tokens=1000, max_group_prompts=64)
    # [[1], [3, 2, 0]]  longest first; 900 + 880 > 1000 so they split
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def group_by_length(lengths: Sequence[int], max_group_tokens: int, max_group_prompts: int,
                    sort: bool = True) -> list[list[int]]:
    """Indices into `lengths`, cut into groups of <= max_group_prompts and <= max_group_tokens.

    With sort=True items go longest first. An item longer than the token budget forms a
    group of its own (it must still run). Zero-length items ride along with any group.
    """
    assert max_group_tokens >= 1 and max_group_prompts >= 1, (max_group_tokens, max_group_prompts)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    groups: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        if cur and (len(cur) >= max_group_prompts or tokens + lengths[i] > max_group_tokens):
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += lengths[i]
    if cur:
        groups.append(cur)
    return groups


@dataclass
class GroupConfig:
    """The budgets every library entry point groups and packs by (engine, scorer)."""

    pack_capacity: int | None = None  # row width in tokens (>= longest unit); None = longest (paper)
    max_group_prompts: int = 64  # prompts (or items) per forward pass, >= 1
    max_group_tokens: int = 16384  # tokens per forward pass (bounds prefill memory), >= 1

    def __post_init__(self):
        for key in ("pack_capacity", "max_group_prompts", "max_group_tokens"):
            value = getattr(self, key)
            if (value is not None or key != "pack_capacity") and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be {'None or ' if key == 'pack_capacity' else ''}an int >= 1, "
                                 f"got {value!r}")

    def groups(self, lengths: Sequence[int], sort: bool = True) -> list[list[int]]:
        return group_by_length(lengths, self.max_group_tokens, self.max_group_prompts, sort)
