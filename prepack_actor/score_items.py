"""Scoring items at the edge: validation with specific reasons, and the harness tokenization.

Tokenization rule (lm-evaluation-harness `_encode_pair`):
1. Trailing whitespace of the prompt moves onto the start of each choice
   ("Answer: " + "A" is scored as "Answer:" + " A").
2. `context + continuation` is encoded whole, and the context alone; the choice's tokens
   are the whole string's tokens past the context's token count. So a BPE merge across
   the boundary is kept as it would appear in running text.
3. The pair is scored as the whole string's tokens (prompt part = its first
   len(context tokens) tokens). Special tokens are added as the tokenizer does by
   default (BOS for Llama-style tokenizers); lm-eval's HF default leaves BOS out.
Shared layout: the prompt is laid out once only when every choice's whole-string tokens
start with the same prompt tokens. When a boundary merge makes them differ for some
choice, that item falls back to the simple layout (one unit per pair); so does an item
whose prompt + all choices do not fit in the row capacity. Both give the same scores.
Items whose pairs exceed the model's context are errors (the harness truncates on the
left instead; we do not silently change what is scored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .score_pack import Unit


class BadItem(ValueError):
    """An item that cannot be scored; `kind` names the problem for error rows."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class ScoreItem:
    prompt: str
    choices: list[str]  # continuation strings, >= 1
    answer: int | None = None  # index into choices of the correct one


@dataclass
class EncodedItem:
    pairs: list[list[int]]  # whole-string tokens of prompt + choice, per choice
    context_len: int  # tokens of the prompt part (the first context_len of each pair)
    shareable: bool  # every pair starts with the same context_len tokens

    def units(self, shared: bool) -> list[Unit]:
        """One tree unit (shared and shareable) or one unit per pair."""
        c = self.context_len
        if shared and self.shareable:
            return [Unit(self.pairs[0][:c], [p[c:] for p in self.pairs])]
        return [Unit(p[:c], [p[c:]]) for p in self.pairs]


def check_item(raw: Mapping[str, Any] | ScoreItem) -> ScoreItem:
    """A validated item; raises BadItem (a ValueError) with the reason (no index)."""
    if isinstance(raw, ScoreItem):
        raw = {"prompt": raw.prompt, "choices": raw.choices, "answer": raw.answer}
    if not isinstance(raw, Mapping):
        raise BadItem("bad_item", f"expected a mapping with 'prompt' and 'choices', got {type(raw).__name__}")
    prompt, choices, answer = raw.get("prompt"), raw.get("choices"), raw.get("answer")
    if not isinstance(prompt, str):
        raise BadItem("bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise BadItem("bad_prompt", "empty prompt")
    if hasattr(choices, "tolist") and not isinstance(choices, str):  # numpy arrays from Arrow
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)):
        raise BadItem("bad_choices", f"'choices' must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise BadItem("bad_choices", "'choices' is empty")
    for j, c in enumerate(choices):
        if not isinstance(c, str):
            raise BadItem("bad_choices", f"choice {j} must be a string, got {type(c).__name__}")
        if not c:
            raise BadItem("bad_choices", f"choice {j} is an empty string")
    if answer is not None:
        if hasattr(answer, "item") and not isinstance(answer, bool):  # numpy scalars
            answer = answer.item()
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise BadItem("bad_answer", f"'answer' must be an integer index, got {type(answer).__name__}")
        if not 0 <= answer < len(choices):
            raise BadItem("bad_answer", f"'answer' {answer} out of range for {len(choices)} choices")
    return ScoreItem(prompt, list(choices), answer)


def encode_item(tokenizer, item: ScoreItem, max_context: int | None = None) -> EncodedItem:
    """Harness tokenization of every (prompt, choice) pair; BadItem with the reason."""
    context = item.prompt.rstrip()
    moved = item.prompt[len(context):]  # trailing whitespace goes onto each choice
    ctx = tokenizer(context)["input_ids"]
    if not ctx:
        raise BadItem("bad_prompt", "prompt has no tokens to condition on")
    pairs = []
    for j, choice in enumerate(item.choices):
        whole = tokenizer(context + moved + choice)["input_ids"]
        if len(whole) <= len(ctx):
            raise BadItem("bad_choices", f"choice {j} ({choice!r}) adds no tokens past the prompt's")
        if max_context is not None and len(whole) > max_context:
            raise BadItem("too_long", f"prompt + choice {j} is {len(whole)} tokens > the model's context {max_context}")
        pairs.append(whole)
    c = len(ctx)
    shareable = all(p[:c] == pairs[0][:c] for p in pairs[1:])
    return EncodedItem(pairs, c, shareable)
