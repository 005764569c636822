"""Stop checks on tensors for the running batch: EOS ids, stop_token_ids, max_new_tokens, min_tokens.

vLLM's rules, as the engine's StopChecker applies them, without text: nothing stops before
min_tokens tokens; then EOS (unless ignore_eos), then a stop token id; else max_new_tokens
ends it as "length". Stop strings need text and stay with the engine, for the sequences
that have them. `check` returns one code per row; the caller syncs once per step.
"""
from __future__ import annotations

import torch

from .params import SamplingParams

RUNNING, EOS, STOP_ID, LENGTH = 0, 1, 2, 3  # per-row codes of Finisher.check


class Finisher:
    """Per-row stop state of the running batch; rows join with `extend` and leave with `select`."""

    def __init__(self, params: list[SamplingParams], eos_ids: set[int] | frozenset, device):
        ids = [([] if p.ignore_eos else sorted(eos_ids)) + list(p.stop_token_ids) for p in params]
        width = max([len(x) for x in ids] + [1])
        self.ids = torch.tensor([x + [-1] * (width - len(x)) for x in ids], dtype=torch.long,
                                device=device).view(len(params), width)  # [B, K] -1 = none
        self.is_eos = torch.tensor([[j < len(x) - len(p.stop_token_ids) for j in range(width)]
                                    for x, p in zip(ids, params)], dtype=torch.bool, device=device).view(len(params), width)
        self.min_tokens = torch.tensor([p.min_tokens for p in params], dtype=torch.long, device=device)
        self.max_new = torch.tensor([p.max_new_tokens for p in params], dtype=torch.long, device=device)
        self.generated = torch.zeros(len(params), dtype=torch.long, device=device)

    def check(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B], each row's newest token -> code [B] (RUNNING, EOS, STOP_ID or LENGTH)."""
        self.generated += 1
        hit = self.ids == tokens[:, None]  # [B, K]
        free = self.generated > self.min_tokens
        eos = free & (hit & self.is_eos).any(-1)
        stop_id = free & (hit & ~self.is_eos).any(-1)
        length = self.generated >= self.max_new
        return torch.where(eos, EOS, torch.where(stop_id, STOP_ID, torch.where(length, LENGTH, RUNNING)))

    def select(self, keep: torch.Tensor) -> None:
        for name in ("ids", "is_eos", "min_tokens", "max_new", "generated"):
            setattr(self, name, getattr(self, name)[keep.to(self.ids.device)])

    def extend(self, other: "Finisher") -> None:
        """Rows of `other` join after this batch's rows."""
        width = max(self.ids.shape[1], other.ids.shape[1])
        for name, fill in (("ids", -1), ("is_eos", False)):
            a, b = getattr(self, name), getattr(other, name)
            a, b = (torch.cat([x, x.new_full((len(x), width - x.shape[1]), fill)], 1) for x in (a, b))
            setattr(self, name, torch.cat([a, b]))
        for name in ("min_tokens", "max_new", "generated"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
