"""The decode loop: continue every prompt of a group from its left-padded cache.

Text never enters here: `stopped(s, tokens)` is the caller's test for EOS, stop token ids and
stop strings. A batch row is a sequence: one per prompt, or n per prompt (`sampling.expand`)
continuing copies of the prompt's cache (`kv_cache.unpack(..., index)`).

Plain functions in the gpt-fast manner. Prompts leave the batch as they finish, and the
left pad shared by all remaining prompts is cropped, so finished work costs nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import attention, kv_cache
from .block_cache import BlockCache, BlockDecodeUnsupported
from .forward import last_token_logits
from .packing import pack
from .sampling import Logprob, Sampler, SamplingParams, Step


@dataclass
class Decoded:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop token id or a stop string) or "length"
    stop_at: int | None  # char offset where a stop string begins in the decoded text
    stop_reason: str | int | None  # the stop string or stop token id that matched (vLLM); None for EOS
    finished_at: float  # perf_counter() when the sequence finished
    logprobs: list[dict[int, Logprob]] | None = None  # one per token, when asked


@torch.inference_mode()
def decode(model, cache, attention_mask: torch.Tensor, lengths: torch.Tensor,
           first: Step, sampler: Sampler, params: list[SamplingParams],
           stopped: Callable[[int, list[int]], tuple[bool, int | None, str | int | None]],
           sync=lambda: None, keys: list[int] | None = None) -> list[Decoded]:
    """Generate from a batched cache, one row per sequence.

    attention_mask: [S, Lmax] (0 = left pad), lengths: [S] prompt lengths, first: the step
    sampled from the prefill logits. stopped(s, tokens) -> (stopped, char offset of a stop
    string or None, stop reason) for sequence s after each new token. keys: [read, real]
    counters, increased by the keys each layer attends per step (padding included / not).
    """
    device = attention_mask.device
    n = len(params)
    out: list[list[int]] = [[t] for t in first.tokens.tolist()]
    lps: list[list | None] = [[d] if d is not None else None for d in first.logprobs] if first.logprobs else [None] * n
    done: list[Decoded | None] = [None] * n
    active = torch.arange(n)  # sequence index of each batch row
    last = first.tokens.to(device)  # [A]
    positions = lengths.to(device)  # [A] position of the token in `last`
    while True:
        sync()
        now = time.perf_counter()
        keep = []
        for b, p in enumerate(active.tolist()):
            stop, stop_at, reason = stopped(p, out[p])
            if stop or len(out[p]) >= params[p].max_new_tokens:
                done[p] = Decoded(out[p], "stop" if stop else "length", stop_at, reason, now, lps[p])
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
        if keys is not None:
            keys[0] += attention_mask.numel()
            keys[1] += int(attention_mask.sum())
        logits = model(
            input_ids=last[:, None],  # [A, 1]
            position_ids=positions[:, None],  # [A, 1]
            attention_mask=attention_mask,  # [A, cached + 1]
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1].float()  # [A, V]
        step = sampler(logits)
        last = step.tokens
        positions = positions + 1
        for b, (p, t) in enumerate(zip(active.tolist(), last.tolist())):
            out[p].append(t)
            if step.logprobs is not None and lps[p] is not None:
                lps[p].append(step.logprobs[b])


@torch.inference_mode()
def block_step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step of the running batch over a BlockCache: tokens, positions [B] -> logits [B, V] fp32.

    No attention mask: the cache says which keys each row reads (block_attention)."""
    cache.prepare()
    with attention.decoding(cache):
        logits = model(
            input_ids=tokens[:, None],  # [B, 1]
            position_ids=positions[:, None],  # [B, 1]
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1].float()  # [B, V]
    cache.advance()
    return logits


@torch.inference_mode()
def block_decode_refusal(model, block_size: int, pad_id: int) -> str | None:
    """Why `model` cannot decode from a BlockCache, found by one decode step of a 2-token
    prompt (e.g. DiffLlama changes V between the cache and attention); None if it can."""
    packed = pack([[pad_id] * 2], None, pad_id, stream=True)
    _, cache = last_token_logits(model, packed, varlen=True)
    blocks = BlockCache(model.config.num_hidden_layers, block_size)
    blocks.add(cache, packed, [3], None)
    try:
        block_step(model, blocks, torch.tensor([pad_id], device=model.device), packed.length.to(model.device))
    except BlockDecodeUnsupported as e:
        return str(e)
    return None
