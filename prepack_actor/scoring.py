"""Log-likelihood scoring of multiple-choice items with prepacked prefill (no generation).

    results = score(model, tokenizer, [{"prompt": "Q ... Answer:", "choices": [" A", " B"], "answer": 0}])
    results[0].choice_logprobs, results[0].pred, results[0].correct

For every (prompt, choice) pair: the sum of the choice tokens' log-probabilities given the
prompt, the number of choice tokens, and whether every choice token is the argmax.
Tokenization follows lm-evaluation-harness (see inputs.py for the exact rule).

Modes:
- "simple": each prompt + choice is its own packed segment (the paper's layout).
- "shared": the prompt is packed once and the choices are branches of a tree mask
  (core/masks.py), so a 4-choice item costs one prompt plus four short continuations.
  Items whose prompt tokens are not common to all choices fall back to "simple".

Per group of items (under `max_group_tokens`, `max_group_prompts`): pack FFD, one forward, sums.
`pred` is the argmax of the sums; `pred_norm` of the sums divided by the choice's length
in characters (lm-eval's acc_norm) or in tokens (`length_norm="tokens"`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from . import unpacked
from .capability import PACKED
from .core.forward import branch_logprobs
from .core.grouping import GroupConfig
from .core.packing import pack
from .inputs import BadInput, EncodedItem, ItemError, ScoreItem, check_item, encode_item
from .models import ModelRunner

MODES = ("shared", "simple")
NORMS = ("chars", "tokens")


@dataclass
class ScoreConfig(GroupConfig):
    mode: str = "shared"  # "shared" (prompt once, choices as tree branches) | "simple" (pair per segment)
    length_norm: str = "chars"  # pred_norm divides by choice "chars" (lm-eval acc_norm) | "tokens"
    max_group_prompts: int = 256  # items per forward pass, >= 1
    max_group_tokens: int = 8192  # tokens laid out per forward pass (bounds memory), >= 1

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.length_norm not in NORMS:
            raise ValueError(f"length_norm must be one of {NORMS}, got {self.length_norm!r}")


@dataclass
class ScoreResult:
    choice_logprobs: list[float] = field(default_factory=list)  # sum of log-probs per choice
    choice_num_tokens: list[int] = field(default_factory=list)  # continuation tokens per choice
    choice_is_greedy: list[bool] = field(default_factory=list)  # every choice token is the argmax
    pred: int | None = None  # argmax of choice_logprobs
    pred_norm: int | None = None  # argmax of length-normalised choice_logprobs
    correct: bool | None = None  # pred == answer; None without an answer
    correct_norm: bool | None = None  # pred_norm == answer; None without an answer
    num_tokens: int = 0  # tokens this item laid out (prompt once per unit + choices)
    shared: bool = False  # laid out as one prompt-shared tree
    prefill_s: float = 0.0  # this item's token share of its group's forward pass
    pack_units: int = 0  # units in the item's group (rows before packing)
    pack_rows: int = 0  # packed rows of the item's group
    pack_efficiency: float = 0.0  # real tokens / packed slots of the group, in (0, 1]
    error: str | None = None  # why the item could not be scored; other fields empty
    engine_path: str = "packed"  # "packed" | "unpacked" (each pair its own forward; capability.py)


def decide(logprobs: Sequence[float], num_tokens: Sequence[int], choices: Sequence[str],
           answer: int | None, length_norm: str = "chars") -> dict[str, Any]:
    """pred / pred_norm / correct / correct_norm from per-choice sums (the one aggregation)."""
    lengths = [len(c) for c in choices] if length_norm == "chars" else list(num_tokens)
    normed = [lp / max(1, n) for lp, n in zip(logprobs, lengths)]
    pred = max(range(len(logprobs)), key=logprobs.__getitem__)  # first on ties, like argmax
    pred_norm = max(range(len(normed)), key=normed.__getitem__)
    return {"pred": pred, "pred_norm": pred_norm,
            "correct": None if answer is None else pred == answer,
            "correct_norm": None if answer is None else pred_norm == answer}


def prepare(tokenizer, raw: Mapping[str, Any] | ScoreItem, max_context: int | None,
            pack_capacity: int | None = None) -> tuple[ScoreItem, EncodedItem]:
    """Validate and tokenize one item (no model needed); ValueError with the reason."""
    item = check_item(raw)
    enc = encode_item(tokenizer, item, max_context)
    if pack_capacity is not None:
        longest = max(range(len(enc.pairs)), key=lambda j: len(enc.pairs[j]))
        if len(enc.pairs[longest]) > pack_capacity:
            raise BadInput("too_long", f"prompt + choice {longest} is {len(enc.pairs[longest])} tokens "
                             f"> pack_capacity {pack_capacity}")
        if enc.shareable and enc.units(True)[0].num_tokens > pack_capacity:
            enc.shareable = False  # the tree does not fit one row: the pairs do
    return item, enc


class Scorer(ModelRunner):
    """Holds the model, tokenizer and config; `score(items)` is the whole pipeline."""

    def __init__(self, model, tokenizer, config: ScoreConfig | None = None):
        super().__init__(model, tokenizer)
        self.config = config or ScoreConfig()

    def prepare(self, raw: Mapping[str, Any] | ScoreItem) -> tuple[ScoreItem, EncodedItem]:
        """Validate and tokenize one item; ValueError with the reason."""
        return prepare(self.tokenizer, raw, self.max_context, self.config.pack_capacity)

    def score(self, items: Sequence[Mapping[str, Any] | ScoreItem], errors: str = "raise") -> list[ScoreResult]:
        """One result per item, in input order. errors: "raise" (ItemError) | "return" (result.error)."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        results: list[ScoreResult | None] = [None] * len(items)
        good: list[int] = []
        prepared: list[tuple[ScoreItem, EncodedItem]] = []
        for i, raw in enumerate(items):
            try:
                prepared.append(self.prepare(raw))
                good.append(i)
            except BadInput as e:
                if errors == "raise":
                    raise ItemError(i, e.reason, e.kind) from None
                results[i] = ScoreResult(error=str(e))
        for i, r in zip(good, self.score_prepared(prepared)):
            results[i] = r
        return results  # type: ignore[return-value]

    def score_prepared(self, prepared: list[tuple[ScoreItem, EncodedItem]]) -> list[ScoreResult]:
        """Score validated, tokenized items group by group; results in input order."""
        if self.capability.route != PACKED:  # not on the plain packed path: each pair alone (capability.py)
            return unpacked.score(self, prepared)
        shared = self.config.mode == "shared"
        sizes = [sum(u.num_tokens for u in enc.units(shared)) for _, enc in prepared]
        results: list[ScoreResult | None] = [None] * len(prepared)
        for g in self.groups(sizes):
            for i, r in zip(g, self.score_group([prepared[i] for i in g])):
                results[i] = r
        return results  # type: ignore[return-value]

    def groups(self, sizes: list[int]) -> list[list[int]]:
        """Item indices in groups under the budgets, longest first (similar lengths pack well)."""
        return self.config.groups(sizes)

    def score_group(self, prepared: list[tuple[ScoreItem, EncodedItem]]) -> list[ScoreResult]:
        """Pack one group, one forward, then sums per choice and decisions per item."""
        units = [enc.units(self.config.mode == "shared") for _, enc in prepared]
        flat = [u for us in units for u in us]
        batch = pack([u.prefix for u in flat], self.config.pack_capacity, self.pad_id, [u.branches for u in flat])
        t0 = self.now()
        logprob, greedy, branch = branch_logprobs(self.model, batch)  # [T] each
        prefill_s = self.now() - t0
        sums, counts, all_greedy = per_branch(logprob, greedy, branch, len(batch.branch_length))
        out, b = [], 0
        for (item, enc), us in zip(prepared, units):
            n = len(item.choices)
            lps, nts, grd = sums[b:b + n], counts[b:b + n], all_greedy[b:b + n]
            b += n
            tokens = sum(u.num_tokens for u in us)
            out.append(ScoreResult(
                choice_logprobs=lps, choice_num_tokens=nts, choice_is_greedy=grd,
                **decide(lps, nts, item.choices, item.answer, self.config.length_norm),
                num_tokens=tokens, shared=len(us) == 1 and n > 1,
                prefill_s=prefill_s * tokens / batch.num_tokens, pack_units=len(flat),
                pack_rows=batch.num_rows, pack_efficiency=batch.efficiency))
        return out


def score(model, tokenizer, items: Sequence[Mapping[str, Any] | ScoreItem], mode: str | None = None,
          config: ScoreConfig | None = None, errors: str = "raise") -> list[ScoreResult]:
    """Score items (dicts with prompt, choices, optional answer); results in input order.

    mode overrides config.mode when given; the default is ScoreConfig's ("shared").
    """
    config = config or ScoreConfig()
    if mode is not None:
        config = replace(config, mode=mode)
    return Scorer(model, tokenizer, config).score(items, errors)


def per_branch(values: torch.Tensor, greedy: torch.Tensor, branch: torch.Tensor,
               num_branches: int) -> tuple[list[float], list[int], list[bool]]:
    """Sum target log-probs per branch -> (sum, tokens, all tokens greedy), branch order."""
    total = torch.zeros(num_branches, dtype=torch.float64).index_add_(0, branch, values.double())
    count = torch.zeros(num_branches, dtype=torch.long).index_add_(0, branch, torch.ones_like(branch))
    misses = torch.zeros(num_branches, dtype=torch.long).index_add_(0, branch, (~greedy).long())
    return total.tolist(), count.tolist(), (misses == 0).tolist()


def accuracy(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """Counts and accuracy (both rules) over scored items with an answer."""
    scored = [r for r in results if r.error is None]
    judged = [r for r in scored if r.correct is not None]
    n = len(judged)
    return {"items": len(results), "scored": len(scored), "errors": len(results) - len(scored),
            "judged": n,
            "accuracy": sum(r.correct for r in judged) / n if n else None,
            "accuracy_norm": sum(r.correct_norm for r in judged) / n if n else None}
