"""Inputs at the edge: prompt and item validation and tokenization, with specific errors.

One error type for the library: `InputError(index, kind, reason)` ("prompt 3: empty prompt");
`PromptError` (generation) and `ItemError` (scoring) name what the index counts. A single
prompt or item that fails raises `BadInput(kind, reason)`; the job turns it into an error
row of that kind, the library into an InputError at its index.

Prompts: a string (tokenized with the tokenizer's defaults) or a list of token ids. A
prompt longer than its limit is an error, or with over_long="truncate" keeps its last
tokens (the job's prompts.over_long).

Scoring items: {prompt, choices, answer?}. Tokenization rule (lm-evaluation-harness `_encode_pair`):
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
from typing import Any, Mapping, Sequence, Union

Prompt = Union[str, Sequence[int]]


class BadInput(ValueError):
    """One prompt or item that cannot be run; `kind` names the problem for error rows."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class InputError(ValueError):
    """An input that cannot be run; `index` is its position in the input list."""

    what = "input"

    def __init__(self, index: int, reason: str, kind: str = "bad_input"):
        super().__init__(f"{self.what} {index}: {reason}")
        self.index, self.kind, self.reason = index, kind, reason


class PromptError(InputError):
    what = "prompt"


class ItemError(InputError):
    what = "item"


def encode_prompt(tokenizer, prompt: Prompt, max_context: int | None, reserve: int = 0,
                  over_long: str = "error", max_prompt_tokens: int = 0) -> tuple[list[int], int]:
    """(token ids, tokens cut by truncation) of one prompt; raises BadInput.

    The limit is max_prompt_tokens, or (when 0) the context minus `reserve` new tokens.
    """
    assert over_long in ("error", "truncate"), over_long
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadInput("empty_prompt", "empty prompt")
        ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
        ids = list(prompt)
        vocab = len(tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadInput("bad_prompt", f"token id {bad[0]} outside the vocabulary [0, {vocab})")
    else:
        raise BadInput("bad_prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise BadInput("empty_prompt", "empty prompt (no tokens)")
    limit = max_prompt_tokens or (max_context - reserve if max_context else 0)
    if max_context is not None and not max_prompt_tokens and limit < 1:
        raise BadInput("prompt_too_long", f"{reserve} new tokens leave no room in the model's context of "
                                          f"{max_context}")
    if limit and len(ids) > limit:
        if over_long == "truncate":
            return ids[-limit:], len(ids) - limit
        extra = f" + {reserve} new tokens" if reserve and not max_prompt_tokens else ""
        where = f"the limit of {limit}" if max_prompt_tokens else f"the model's context of {max_context}"
        raise BadInput("prompt_too_long", f"{len(ids)} prompt tokens{extra} exceed {where}")
    return ids, 0


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_context: int | None,
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
            out.append(encode_prompt(tokenizer, p, max_context, r)[0])
        except BadInput as e:
            raise PromptError(i, e.reason, e.kind) from None
    return out


@dataclass
class Unit:
    """What the scorer packs: a prompt prefix and its branches (continuations)."""

    prefix: list[int]  # prompt tokens, >= 1
    branches: list[list[int]]  # continuation tokens per branch, each >= 1

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)


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
    """A validated item; raises BadInput with the reason (no index)."""
    if isinstance(raw, ScoreItem):
        raw = {"prompt": raw.prompt, "choices": raw.choices, "answer": raw.answer}
    if not isinstance(raw, Mapping):
        raise BadInput("bad_item", f"expected a mapping with 'prompt' and 'choices', got {type(raw).__name__}")
    prompt, choices, answer = raw.get("prompt"), raw.get("choices"), raw.get("answer")
    if not isinstance(prompt, str):
        raise BadInput("bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise BadInput("bad_prompt", "empty prompt")
    if hasattr(choices, "tolist") and not isinstance(choices, str):  # numpy arrays from Arrow
        choices = choices.tolist()
    if not isinstance(choices, (list, tuple)):
        raise BadInput("bad_choices", f"'choices' must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise BadInput("bad_choices", "'choices' is empty")
    for j, c in enumerate(choices):
        if not isinstance(c, str):
            raise BadInput("bad_choices", f"choice {j} must be a string, got {type(c).__name__}")
        if not c:
            raise BadInput("bad_choices", f"choice {j} is an empty string")
    if answer is not None:
        if hasattr(answer, "item") and not isinstance(answer, bool):  # numpy scalars
            answer = answer.item()
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise BadInput("bad_answer", f"'answer' must be an integer index, got {type(answer).__name__}")
        if not 0 <= answer < len(choices):
            raise BadInput("bad_answer", f"'answer' {answer} out of range for {len(choices)} choices")
    return ScoreItem(prompt, list(choices), answer)


def encode_item(tokenizer, item: ScoreItem, max_context: int | None = None) -> EncodedItem:
    """Harness tokenization of every (prompt, choice) pair; BadItem with the reason."""
    context = item.prompt.rstrip()
    moved = item.prompt[len(context):]  # trailing whitespace goes onto each choice
    ctx = tokenizer(context)["input_ids"]
    if not ctx:
        raise BadInput("bad_prompt", "prompt has no tokens to condition on")
    pairs = []
    for j, choice in enumerate(item.choices):
        whole = tokenizer(context + moved + choice)["input_ids"]
        if len(whole) <= len(ctx):
            raise BadInput("bad_choices", f"choice {j} ({choice!r}) adds no tokens past the prompt's")
        if max_context is not None and len(whole) > max_context:
            raise BadInput("too_long", f"prompt + choice {j} is {len(whole)} tokens > the model's context {max_context}")
        pairs.append(whole)
    c = len(ctx)
    shareable = all(p[:c] == pairs[0][:c] for p in pairs[1:])
    return EncodedItem(pairs, c, shareable)
