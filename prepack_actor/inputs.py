"""Inputs at the edge: prompt and item validation and tokenization, with specific errors.

One error type for the library: `InputError(index, kind, reason)` ("prompt 3: empty prompt");
`PromptError` (generation) and `ItemError` (scoring) name what the index counts. A single
prompt or item that fails raises `BadInput(kind, reason)`; the job turns it into an error
row of that kind, the library into an InputError at its index.

Prompts: a string (tokenized with the tokenizer's defaults) or a list of token ids. A
prompt longer than its limit is an error, or with over_long="truncate" keeps its last
tokens (the job's prompts.over_long).

Scoring items: {prompt, choices, answer?}. Tokenization is lm-evaluation-harness 0.4.13's
(`TemplateLM._encode_pair` with `HFLM.tok_encode`), so the tokens scored are lm-eval's:
1. Trailing whitespace of the prompt moves onto the start of each choice
   ("Answer: " + "A" is scored as "Answer:" + " A").
2. The context is the prompt encoded alone; a choice's tokens are those of the whole
   string `context + choice` past the context's token count (a BPE merge across the
   boundary stays as it appears in running text). The model sees context + choice tokens.
3. Special tokens as HFLM adds them: the tokenizer's default (`add_special_tokens=True`:
   BOS for Llama-style tokenizers, nothing for GPT-2's), except a string that already
   starts with the BOS text is encoded without them. HFLM's `add_bos_token` left unset.
All strings of a call are tokenized in one batched tokenizer call (`encode_ids`).
Items whose context + choice (less the last token, which is never an input) exceed the
model's context are errors (the harness truncates on the left instead; we do not silently
change what is scored).
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
class ScoreItem:
    prompt: str
    choices: list[str]  # continuation strings, >= 1
    answer: int | None = None  # index into choices of the correct one


@dataclass
class EncodedItem:
    context: list[int]  # the prompt's tokens (lm-eval's context_enc), >= 1
    continuations: list[list[int]]  # each choice's tokens (lm-eval's continuation_enc), >= 1 each

    def num_tokens(self, shared: bool) -> int:
        """Tokens laid out: the context once (shared) or per choice, plus each choice but its last token."""
        tails = {tuple(c[:-1]) for c in self.continuations} if shared else [tuple(c[:-1]) for c in self.continuations]
        return len(self.context) * (1 if shared else len(self.continuations)) + sum(len(t) for t in tails)


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


def encode_ids(tokenizer, strings: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per string in one batched call (each distinct string once), special tokens as
    lm-eval's HFLM.tok_encode adds them: `add_special_tokens` (the tokenizer's default: True),
    none for a string that already starts with the BOS text (HFLM's prefix token)."""
    mark = _bos_text(tokenizer)
    distinct = list(dict.fromkeys(strings))
    ids: dict[str, list[int]] = {}
    led = [bool(mark) and s.startswith(mark) for s in distinct]
    for special, todo in ((add_special_tokens, [s for s, b in zip(distinct, led) if not b]),
                          (False, [s for s, b in zip(distinct, led) if b])):
        if todo:
            ids.update(zip(todo, map(list, tokenizer(todo, add_special_tokens=special)["input_ids"])))
    return [ids[s] for s in strings]


def prefix_token(tokenizer) -> int:
    """lm-eval HFLM's prefix token: BOS, else EOS (conditions an empty context or a
    document's first rolling window)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `_encode_pair` for (context, continuation) string pairs, batched: trailing
    whitespace of the context moves onto the continuation; the context is encoded alone and
    the continuation is the whole string's tokens past the context's token count.

    The whole string is context + choice, so most of it was just encoded. For byte-level BPE
    with GPT-2's pre-tokenizer regex (no normalizer), a " word" preceded by a non-space is the
    start of a pre-token in any text, and BPE never merges across pre-tokens: the whole string's
    tokens are the context's tokens before that point + the tokens of the rest alone. Only the
    rest is encoded then (same tokens, a fraction of the work); other tokenizers encode it whole.
    """
    stripped = [c.rstrip() for c, _ in pairs]
    assert all(stripped), "lm-eval puts the prefix token in place of an empty context"
    wholes = [s + c[len(s):] + cont for s, (c, cont) in zip(stripped, pairs)]
    ctx_ids, split = _encode_contexts(tokenizer, list(dict.fromkeys(stripped)))
    tail = [k for k, s in enumerate(stripped) if s in split]
    full = [k for k, s in enumerate(stripped) if s not in split]
    whole_ids: dict[int, list[int]] = dict(zip(full, encode_ids(tokenizer, [wholes[k] for k in full])))
    if tail:
        rests = tokenizer([wholes[k][split[stripped[k]][0]:] for k in tail], add_special_tokens=False)["input_ids"]
        for k, rest in zip(tail, rests):
            cut, n = split[stripped[k]]
            whole_ids[k] = ctx_ids[stripped[k]][:n] + list(rest)
    return [(ctx_ids[s], whole_ids[k][len(ctx_ids[s]):]) for k, s in enumerate(stripped)]


def _encode_contexts(tokenizer, contexts: list[str]) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]]]:
    """Token ids per context, and where a context can be cut: (char index, tokens before it)."""
    mark = _bos_text(tokenizer)
    local = [s for s in contexts if _local_bpe(tokenizer) and not (mark and s.startswith(mark))]
    ids: dict[str, list[int]] = {}
    split: dict[str, tuple[int, int]] = {}
    if local:
        enc = tokenizer(local, return_offsets_mapping=True)
        for s, x, offsets in zip(local, enc["input_ids"], enc["offset_mapping"]):
            ids[s] = list(x)
            cut = next((i for i in range(len(s) - 2, 0, -1)
                        if s[i] == " " and not s[i - 1].isspace() and s[i + 1].isalpha()), None)
            if cut is not None:
                split[s] = (cut, sum(1 for _, end in offsets if end <= cut))
    rest = [s for s in contexts if s not in ids]
    ids.update(zip(rest, encode_ids(tokenizer, rest)))
    return ids, split


def _bos_text(tokenizer) -> str:
    """The text of HFLM's prefix token (BOS, else EOS); a string starting with it gets no special tokens."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return tokenizer.decode(prefix) if prefix is not None else ""


def _local_bpe(tokenizer) -> bool:
    """Byte-level BPE with GPT-2's regex pre-tokenizer, no normalizer, no added token holding a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or type(backend.model).__name__ != "BPE":
        return False
    pre = backend.pre_tokenizer
    if type(pre).__name__ != "ByteLevel" or not getattr(pre, "use_regex", False):
        return False
    return not any(any(ch.isspace() for ch in t.content) for t in tokenizer.added_tokens_decoder.values())


def encode_items(tokenizer, items: Sequence[ScoreItem], max_context: int | None = None,
                 pack_capacity: int | None = None) -> list[EncodedItem | BadInput]:
    """lm-eval's tokenization of every (prompt, choice) pair, one tokenizer call for all items;
    per item an EncodedItem or the BadInput that says why it cannot be scored."""
    encoded = encode_pairs(tokenizer, [(item.prompt, c) for item in items for c in item.choices])
    out: list[EncodedItem | BadInput] = []
    k = 0
    for item in items:
        mine = encoded[k:k + len(item.choices)]
        k += len(item.choices)
        out.append(_check_pairs(item, mine[0][0], [c for _, c in mine], max_context, pack_capacity))
    return out


def _check_pairs(item: ScoreItem, ctx: list[int], conts: list[list[int]], max_context: int | None,
                 pack_capacity: int | None) -> EncodedItem | BadInput:
    if not ctx:
        return BadInput("bad_prompt", "prompt has no tokens to condition on")
    for j, (choice, cont) in enumerate(zip(item.choices, conts)):
        if not cont:
            return BadInput("bad_choices", f"choice {j} ({choice!r}) adds no tokens past the prompt's")
        n = len(ctx) + len(cont) - 1  # the model's input: context + choice but its last token
        if max_context is not None and n > max_context:
            return BadInput("too_long", f"prompt + choice {j} is {n + 1} tokens > the model's context "
                                        f"{max_context} + 1")
        if pack_capacity is not None and n > pack_capacity:
            return BadInput("too_long", f"prompt + choice {j} lays out {n} tokens > pack_capacity {pack_capacity}")
    return EncodedItem(list(ctx), conts)


def encode_item(tokenizer, item: ScoreItem, max_context: int | None = None,
                pack_capacity: int | None = None) -> EncodedItem:
    """One item's EncodedItem (encode_items); raises BadInput with the reason."""
    enc = encode_items(tokenizer, [item], max_context, pack_capacity)[0]
    if isinstance(enc, BadInput):
        raise enc
    return enc
