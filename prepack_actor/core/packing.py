"""First-fit-decreasing bin packing of prompts into rows, and the packed batch it yields.

One layout for every task: a prompt alone (generation), or a prompt followed by branches
(scoring: the choices, each continuing the prompt's positions; see masks.py).

`binpacking.to_constant_volume` (2.x) picks the least-loaded bin and is quadratic, so
it is neither FFD nor fast enough for 100k prompts (see shared/design/architecture.md).
`ffd` below is the textbook algorithm: sort by length descending, put each item in the
first row it fits. A segment tree over row residuals finds that row in O(log rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    """Units laid out in packed rows. R rows of width W, P units (prompt + its branches), B branches."""

    input_ids: torch.Tensor  # [R, W] long, pad slots hold pad_id
    position_ids: torch.Tensor  # [R, W] long, restart at 0 per unit (and for the pad run at a row's end);
    #                            branches continue their prompt's
    segment_ids: torch.Tensor  # [R, W] long, unit index per slot; -1 for pad slots
    branch_ids: torch.Tensor  # [R, W] long, 0 for prompt and pad slots, j >= 1 for the unit's branch j-1
    row: torch.Tensor  # [P] row of each unit
    offset: torch.Tensor  # [P] first column of each unit in its row
    length: torch.Tensor  # [P] tokens of each unit's prompt (branches excluded)
    branch_unit: torch.Tensor  # [B] unit of each branch (units' branches in order)
    branch_offset: torch.Tensor  # [B] first column of each branch in its unit's row
    branch_length: torch.Tensor  # [B] tokens of each branch
    num_tokens: int  # real tokens laid out (prompts and branches)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: 1.0 means no padding at all."""
        return self.num_tokens / max(1, self.input_ids.numel())

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """[S + 1] int32 boundaries of the segments over the flattened R*W slots (varlen attention).

        A segment is a unit (prompt and its branches) or a row's pad run; in the one-stream
        layout (pack(..., stream=True)) the segments are exactly the prompts.
        """
        seg = self.segment_ids.reshape(-1)
        start = torch.ones_like(seg, dtype=torch.bool)
        start[1:] = seg[1:] != seg[:-1]
        start[:: self.width] = True  # every row starts a segment
        cu = torch.nonzero(start).flatten()
        return torch.cat([cu, torch.tensor([seg.numel()])]).to(torch.int32)

    @property
    def last_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of each unit's last prompt token, [P] each."""
        return self.row, self.offset + self.length - 1


def pack(prompts: list[list[int]], capacity: int | None = None, pad_id: int = 0,
         branches: Sequence[Sequence[list[int]]] | None = None, stream: bool = False) -> PackedBatch:
    """Pack token-id lists into rows of `capacity` tokens, first-fit decreasing.

    capacity None means the longest unit (the paper's choice); a capacity below the
    longest unit widens to it, so every unit fits in one row. stream=True lays every unit
    end to end in ONE row [1, T] with no padding (capacity ignored): the layout for varlen
    attention, whose cost is each prompt's own pairs, so wider rows waste nothing. `branches[i]`, when given,
    are continuations of prompt i laid right after it (their positions continue from
    len(prompts[i]), all siblings from the same position).
    """
    assert prompts and all(len(p) > 0 for p in prompts), "pack needs non-empty prompts"
    branches = branches if branches is not None else [()] * len(prompts)
    assert len(branches) == len(prompts) and all(len(b) > 0 for bs in branches for b in bs), "empty branch"
    sizes = [len(p) + sum(len(b) for b in bs) for p, bs in zip(prompts, branches)]
    rows = [list(range(len(sizes)))] if stream else ffd(sizes, max(capacity or 0, max(sizes)))
    # Rows narrower than `capacity` waste nothing: trim the width to the fullest row.
    width = max(sum(sizes[i] for i in r) for r in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    row_of, offset_of = [0] * len(prompts), [0] * len(prompts)
    for r, items in enumerate(rows):
        col = 0
        for i in items:
            n = sizes[i]
            input_ids[r, col:col + n] = torch.tensor(list(prompts[i]) + [t for b in branches[i] for t in b])
            segment_ids[r, col:col + n] = i
            p = len(prompts[i])
            position_ids[r, col:col + p] = torch.arange(p)
            c = col + p
            for j, b in enumerate(branches[i], start=1):
                position_ids[r, c:c + len(b)] = torch.arange(p, p + len(b))
                branch_ids[r, c:c + len(b)] = j
                c += len(b)
            row_of[i], offset_of[i] = r, col
            col += n
        position_ids[r, col:] = torch.arange(width - col)  # the pad run is a segment of its own
    b_unit = [i for i, bs in enumerate(branches) for _ in bs]
    b_len = [len(b) for bs in branches for b in bs]
    b_off = [offset_of[i] + len(prompts[i]) + sum(len(x) for x in bs[:j])
             for i, bs in enumerate(branches) for j in range(len(bs))]
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, branch_ids=branch_ids,
        row=torch.tensor(row_of), offset=torch.tensor(offset_of),
        length=torch.tensor([len(p) for p in prompts]),
        branch_unit=torch.tensor(b_unit, dtype=torch.long), branch_offset=torch.tensor(b_off, dtype=torch.long),
        branch_length=torch.tensor(b_len, dtype=torch.long), num_tokens=sum(sizes))


def pad_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded layout (baselines, the unpacked fallback) -> input_ids [B, Lmax], attention_mask [B, Lmax] (0 on the left pad)."""
    lmax = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), lmax), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), lmax), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, lmax - len(p):] = torch.tensor(p)
        mask[b, lmax - len(p):] = 1
    return ids, mask
