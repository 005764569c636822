"""The decode loop: continue every prompt of a group from its left-padded cache.

Plain functions in the gpt-fast manner. Prompts leave the batch as they finish, and the
left pad shared by all remaining prompts is cropped, so finished work costs nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import kv_cache
from .sampling import Sampler, SamplingParams


@dataclass
class Decoded:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stop_at: int | None  # char offset where a stop string begins in the decoded text
    finished_at: float  # perf_counter() when the prompt finished


class StopChecker:
    """EOS ids and stop strings; decodes text only for prompts that have stop strings."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def check(self, tokens: list[int], params: SamplingParams) -> tuple[bool, int | None]:
        if not params.ignore_eos and tokens[-1] in self.eos_ids:
            return True, None
        if params.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                return True, min(hits)
        return False, None


@torch.inference_mode()
def decode(model, cache, attention_mask: torch.Tensor, lengths: torch.Tensor,
           first: torch.Tensor, sampler: Sampler, params: list[SamplingParams],
           stops: StopChecker, sync=lambda: None) -> list[Decoded]:
    """Generate from a batched cache.

    attention_mask: [P, Lmax] (0 = left pad), lengths: [P] prompt lengths,
    first: [P] the token sampled from the prefill logits.
    """
    device = attention_mask.device
    n = len(params)
    out: list[list[int]] = [[t] for t in first.tolist()]
    done: list[Decoded | None] = [None] * n
    active = torch.arange(n)  # prompt index of each batch row
    last = first.to(device)  # [A]
    positions = lengths.to(device)  # [A] position of the token in `last`
    while True:
        sync()
        now = time.perf_counter()
        keep = []
        for b, p in enumerate(active.tolist()):
            stopped, stop_at = stops.check(out[p], params[p])
            if stopped or len(out[p]) >= params[p].max_new_tokens:
                done[p] = Decoded(out[p], "stop" if stopped else "length", stop_at, now)
            else:
                keep.append(b)
        if not keep:
            return done  # type: ignore[return-value]
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=device)
            attention_mask, last, positions = attention_mask[idx], last[idx], positions[idx]
            active = active[idx.cpu()]
            sampler.select(idx.cpu())
            # Columns that are left pad for every remaining prompt can go.
            start = int((attention_mask.cumsum(-1) == 0).sum(-1).min())
            attention_mask = attention_mask[:, start:]
            kv_cache.select(cache, idx, start)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], -1)
        logits = model(
            input_ids=last[:, None],  # [A, 1]
            position_ids=positions[:, None],  # [A, 1]
            attention_mask=attention_mask,  # [A, cached + 1]
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1].float()  # [A, V]
        last = sampler(logits)
        positions = positions + 1
        for p, t in zip(active.tolist(), last.tolist()):
            out[p].append(t)
