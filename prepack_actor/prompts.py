"""Prompt validation and tokenization: specific errors at the edge, never deep in torch."""
from __future__ import annotations

from typing import Sequence, Union

Prompt = Union[str, Sequence[int]]


class PromptError(ValueError):
    """A prompt that cannot be run; `index` is its position in the input."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompt {index}: {reason}")
        self.index, self.reason = index, reason


def encode_one(tokenizer, prompt: Prompt, max_context: int | None, reserve: int = 0) -> list[int]:
    """Token ids of one prompt; raises ValueError with the reason (no index)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        ids = list(prompt)
        vocab = len(tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {vocab})")
    else:
        raise ValueError(f"expected a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("empty prompt (no tokens)")
    if max_context is not None and len(ids) + reserve > max_context:
        extra = f" + {reserve} new tokens" if reserve else ""
        raise ValueError(f"{len(ids)} prompt tokens{extra} exceed the model's context of {max_context}")
    return ids


def encode(tokenizer, prompts: Sequence[Prompt], max_context: int | None, reserve: int = 0) -> list[list[int]]:
    """Token ids per prompt; raises PromptError naming the first bad prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not a single string")
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(encode_one(tokenizer, p, max_context, reserve))
        except ValueError as e:
            raise PromptError(i, str(e)) from None
    return out
