"""The baselines prepacking is measured against, on the same model and prompts.

- full batching: a batch padded to its longest prompt, as Hugging Face `generate` does it
  (left padding, 2D attention mask, positions from the mask).
- length-ordered batching: all prompts sorted by length first, then batched and padded.
"""
from __future__ import annotations

import torch

from ..core.packing import pad_left


@torch.inference_mode()
def padded_prefill(model, prompts: list[list[int]], pad_id: int):
    """Full-batching prefill: next-token logits [B, V] (fp32) and the padded cache."""
    ids, mask = pad_left(prompts, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them
    out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                position_ids=position_ids.to(model.device), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values


@torch.inference_mode()
def padded_generate(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int,
                    ignore_eos: bool = False) -> list[list[int]]:
    """Full-batching greedy generation with `model.generate`; new tokens per prompt."""
    ids, mask = pad_left(prompts, pad_id)
    kwargs = {"eos_token_id": None} if ignore_eos else {}
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, **kwargs)
    eos = model.generation_config.eos_token_id
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        if not ignore_eos and eos is not None:  # generate pads after EOS; cut there
            eos_set = set(eos) if isinstance(eos, list) else {eos}
            for j, t in enumerate(row):
                if t in eos_set:
                    row = row[: j + 1]
                    break
        result.append(row)
    return result


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Index batches of a random permutation (the paper's full-batching batches)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def length_ordered_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches after sorting all prompts by length (the paper's length-ordered baseline)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def ideal_speedup(lengths: list[int]) -> float:
    """Padded tokens / real tokens of one batch: the speedup with zero padding."""
    return len(lengths) * max(lengths) / sum(lengths)
