"""First-fit-decreasing bin packing of prompts into rows, and the packed batch it yields.

`binpacking.to_constant_volume` (2.x) picks the least-loaded bin and is quadratic, so
it is neither FFD nor fast enough for 100k prompts (see shared/design/architecture.md).
`ffd` below is the textbook algorithm: sort by length descending, put each item in the
first row it fits. A segment tree over row residuals finds that row in O(log rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack item indices into rows of `capacity` tokens, first-fit decreasing.

    Returns rows of item indices; rows are in opening order, items within a row in
    insertion (descending length) order. Every item appears exactly once.
    """
    if any(n > capacity for n in lengths):
        worst = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"item {worst} has {lengths[worst]} tokens > capacity {capacity}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    n_leaves = 1
    while n_leaves < max(1, len(lengths)):
        n_leaves *= 2
    # tree[k] = max residual capacity among rows under node k; unopened rows hold `capacity`.
    tree = [capacity] * (2 * n_leaves)
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        k = 1
        while k < n_leaves:  # descend to the leftmost leaf with residual >= need
            k += k
            if tree[k] < need:
                k += 1
        row = k - n_leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        tree[k] -= need
        while k > 1:  # refresh ancestors; stop as soon as a maximum is unchanged
            k >>= 1
            a, b = tree[2 * k], tree[2 * k + 1]
            m = a if a > b else b
            if tree[k] == m:
                break
            tree[k] = m
    return rows


@dataclass
class PackedBatch:
    """Prompts laid out in packed rows. R rows of width W, P prompts."""

    input_ids: torch.Tensor  # [R, W] long, pad slots hold pad_id
    position_ids: torch.Tensor  # [R, W] long, restart at 0 per prompt; pad slots 0
    segment_ids: torch.Tensor  # [R, W] long, prompt index per slot; -1 for pad slots
    row: torch.Tensor  # [P] row of each prompt
    offset: torch.Tensor  # [P] first column of each prompt in its row
    length: torch.Tensor  # [P] tokens of each prompt

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: 1.0 means no padding at all."""
        return float(self.length.sum()) / max(1, self.input_ids.numel())

    @property
    def last_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of each prompt's last token, [P] each."""
        return self.row, self.offset + self.length - 1


def pack(prompts: list[list[int]], capacity: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Pack token-id lists into rows of `capacity` tokens.

    capacity None means the longest prompt (the paper's choice); a capacity below the
    longest prompt widens to it, so every prompt fits in one row.
    """
    assert prompts and all(len(p) > 0 for p in prompts), "pack needs non-empty prompts"
    lengths = [len(p) for p in prompts]
    width = max(capacity or 0, max(lengths))
    rows = ffd(lengths, width)
    # Rows narrower than `capacity` waste nothing: trim the width to the fullest row.
    width = max(sum(lengths[i] for i in r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    row_of, offset_of = [0] * len(prompts), [0] * len(prompts)
    for r, items in enumerate(rows):
        col = 0
        for i in items:
            n = lengths[i]
            input_ids[r, col : col + n] = torch.tensor(prompts[i], dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            segment_ids[r, col : col + n] = i
            row_of[i], offset_of[i] = r, col
            col += n
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        row=torch.tensor(row_of),
        offset=torch.tensor(offset_of),
        length=torch.tensor(lengths),
    )
