"""Packed scoring rows: lay units out with `packing.pack`, one forward, per-token log-probs.

A unit is a prompt prefix and its branches (continuations). The simple layout makes one
unit per (prompt, choice) pair; the shared layout makes one unit per item, the prompt
once and every choice as a branch whose positions continue from the prompt's length
(see tree_mask.py). Every continuation token is a target: its log-probability is read
from the logits at the column of the token before it (the last prompt token for a
branch's first token), so sibling branches share the prompt's last column.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tree_mask
from .packing import pack
from .prefill import head_only_at


@dataclass
class Unit:
    prefix: list[int]  # prompt tokens, >= 1
    branches: list[list[int]]  # continuation tokens per branch, each >= 1

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)


@dataclass
class ScoreBatch:
    """Units packed into R rows of width W; T targets (continuation tokens) in all."""

    input_ids: torch.Tensor  # [R, W] long, pad slots hold pad_id
    position_ids: torch.Tensor  # [R, W] long, branches continue from the prompt's length
    unit_ids: torch.Tensor  # [R, W] long, unit index per slot; -1 for pad slots
    branch_ids: torch.Tensor  # [R, W] long, 0 prompt (and pad), j >= 1 for branch j-1
    target_row: torch.Tensor  # [T] row of the column predicting each target
    target_col: torch.Tensor  # [T] that column (the token before the target)
    target_token: torch.Tensor  # [T] the target token id
    target_branch: torch.Tensor  # [T] global branch index (units' branches in order)
    num_tokens: int  # real tokens laid out

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: 1.0 means no padding at all."""
        return self.num_tokens / max(1, self.input_ids.numel())


def layout(units: list[Unit], capacity: int | None = None, pad_id: int = 0) -> ScoreBatch:
    """Pack units first-fit decreasing (capacity None = the longest unit, the paper's)."""
    assert units and all(u.prefix and u.branches and all(u.branches) for u in units), "empty unit"
    flat = [u.prefix + [t for b in u.branches for t in b] for u in units]
    packed = pack(flat, capacity, pad_id)  # FFD rows; we redo positions and add branches
    position_ids = torch.zeros_like(packed.position_ids)
    branch_ids = torch.zeros_like(packed.position_ids)
    rows, cols, tokens, branch_of = [], [], [], []
    g = 0  # global branch index
    for u, unit in enumerate(units):
        r, o, p = int(packed.row[u]), int(packed.offset[u]), len(unit.prefix)
        position_ids[r, o:o + p] = torch.arange(p)
        col = o + p
        for j, b in enumerate(unit.branches, start=1):
            n = len(b)
            position_ids[r, col:col + n] = torch.arange(p, p + n)
            branch_ids[r, col:col + n] = j
            # target t is predicted at the column before it: the prompt's last for t = 0
            rows += [r] * n
            cols += [o + p - 1] + list(range(col, col + n - 1))
            tokens += b
            branch_of += [g] * n
            col += n
            g += 1
    return ScoreBatch(
        input_ids=packed.input_ids, position_ids=position_ids, unit_ids=packed.segment_ids,
        branch_ids=branch_ids, target_row=torch.tensor(rows), target_col=torch.tensor(cols),
        target_token=torch.tensor(tokens), target_branch=torch.tensor(branch_of),
        num_tokens=int(packed.length.sum()))


@torch.inference_mode()
def target_logprobs(model, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the rows -> (log-prob [T] fp32, target is the argmax [T] bool)."""
    device = model.device
    width = batch.input_ids.shape[1]
    flat = batch.target_row * width + batch.target_col  # [T]
    columns, inverse = torch.unique(flat, return_inverse=True)  # [C], [T]
    # The LM head runs only at the C columns we read, not at all R x W slots.
    with head_only_at(model, columns):
        position_ids = batch.position_ids.to(device)
        out = model(
            input_ids=batch.input_ids.to(device),  # [R, W]
            position_ids=position_ids,  # [R, W]
            attention_mask=tree_mask.for_model(model, batch.unit_ids.to(device),
                                               batch.branch_ids.to(device), position_ids),  # [R, 1, W, W]
            use_cache=False,
        )
    logits = out.logits[0].float()[inverse.to(device)]  # [T, V]
    target = batch.target_token.to(device)[:, None]  # [T, 1]
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, target)[:, 0]  # [T]
    greedy = logits.argmax(-1) == target[:, 0]  # [T]
    return logprob.cpu(), greedy.cpu()


def per_branch(values: torch.Tensor, greedy: torch.Tensor, branch: torch.Tensor,
               num_branches: int) -> tuple[list[float], list[int], list[bool]]:
    """Sum target log-probs per branch -> (sum, tokens, all tokens greedy), branch order."""
    total = torch.zeros(num_branches, dtype=torch.float64).index_add_(0, branch, values.double())
    count = torch.zeros(num_branches, dtype=torch.long).index_add_(0, branch, torch.ones_like(branch))
    misses = torch.zeros(num_branches, dtype=torch.long).index_add_(0, branch, (~greedy).long())
    return total.tolist(), count.tolist(), (misses == 0).tolist()
