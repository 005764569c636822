"""Prompt validation and tokenization: specific errors at the edge, never deep in torch."""
from __future__ import annotations

from typing import Sequence, Union

Prompt = Union[str, Sequence[int]]


def context_length(config) -> int | None:
    """The model's context in tokens, from whichever key its config uses."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


def encode(tokenizer, prompts: Sequence[Prompt], max_context: int | None,
           reserve: int | Sequence[int] = 0) -> list[list[int]]:
    """Token ids per prompt; raises PromptError naming the first bad prompt.

    reserve: room each prompt needs for new tokens (one int for all, or one per prompt).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not a single string")
    reserves = [reserve] * len(prompts) if isinstance(reserve, int) else list(reserve)
    assert len(reserves) == len(prompts)
    out = []
    for i, (p, r) in enumerate(zip(prompts, reserves)):
        try:
            out.append(encode_one(tokenizer, p, max_context, r))
        except ValueError as e:
            raise PromptError(i, str(e)) from None
    return out
