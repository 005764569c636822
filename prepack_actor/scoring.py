"""Log-likelihood scoring of multiple-choice items with prepacked prefill (no generation).

    results = score(model, tokenizer, [{"prompt": "Q ... Answer:", "choices": [" A", " B"], "answer": 0}])
    results[0].choice_logprobs, results[0].pred, results[0].correct

For every (prompt, choice) pair: the sum of the choice tokens' log-probabilities given the
prompt, the number of choice tokens, and whether every choice token is the argmax; the
numbers of lm-evaluation-harness 0.4.13's HF backend (tokenization: inputs.py; the layout:
loglik.py).

Modes:
- "shared": one packed unit per distinct prompt; single-token choices are read from the
  prompt's last logits, longer ones are branches of it (loglik.py).
- "simple": each prompt + choice is its own packed segment (the paper's layout).

Per group of items (under `max_group_tokens`, `max_group_prompts`): one or two forward
passes (loglik.score_group), sums. `pred` is the argmax of the sums; `pred_norm` of the sums
divided by the choice's length in characters without the target delimiter (lm-eval's
acc_norm: len(doc_to_choice) with target_delimiter " ") or in tokens (`length_norm="tokens"`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from . import unpacked
from .capability import PACKED
from .core.forward import enable_varlen
from .core.grouping import GroupConfig
from .inputs import BadInput, EncodedItem, ItemError, ScoreItem, check_item, encode_item, encode_items
from .loglik import Loglik, LoglikConfig, Request, RollingDoc, loglikelihood, rolling_doc, score_group
from .models import ModelRunner, on_kernels

MODES = ("shared", "simple")
NORMS = ("chars", "tokens")


@dataclass
class ScoreConfig(GroupConfig):
    mode: str = "shared"  # "shared" (one unit per distinct prompt, choices read from it) | "simple" (pair per segment)
    length_norm: str = "chars"  # pred_norm divides by choice "chars" (lm-eval acc_norm) | "tokens"
    target_delimiter: str = " "  # "chars": a choice's leading delimiter is not counted (lm-eval's target_delimiter)
    varlen: bool = True  # one unpadded stream on varlen attention where the model allows it (forward.varlen_refusal)
    max_group_prompts: int = 256  # items per forward pass, >= 1
    max_group_tokens: int = 8192  # tokens laid out per forward pass (bounds memory), >= 1
    # CPU: linear layers on oneDNN with prepacked weights (core/linear.py), as EngineConfig.
    onednn_linear: bool = True
    compile: bool = False  # decoder layers compiled by inductor (core/compile.py), as EngineConfig

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
    num_tokens: int = 0  # tokens this item laid out (prompt once per unit + choices but their last token)
    shared: bool = False  # the prompt laid out once for all its choices
    prefill_s: float = 0.0  # this item's token share of its group's forward pass
    pack_units: int = 0  # units in the item's group (rows before packing)
    pack_rows: int = 0  # packed rows of the item's group
    pack_efficiency: float = 0.0  # real tokens / packed slots of the group, in (0, 1]
    error: str | None = None  # why the item could not be scored; other fields empty
    engine_path: str = "packed"  # "packed" | "unpacked" (each pair its own forward; capability.py)


def decide(logprobs: Sequence[float], num_tokens: Sequence[int], choices: Sequence[str],
           answer: int | None, length_norm: str = "chars", target_delimiter: str = " ") -> dict[str, Any]:
    """pred / pred_norm / correct / correct_norm from per-choice sums (the one aggregation).

    "chars": lm-eval 0.4.13's acc_norm divides by len(choice) of doc_to_choice, which has no
    target delimiter; our choices carry it (" A"), so a leading `target_delimiter` is not counted.
    """
    if length_norm == "chars":
        lengths = [len(c[len(target_delimiter):] if target_delimiter and c.startswith(target_delimiter) else c)
                   for c in choices]
    else:
        lengths = list(num_tokens)
    normed = [lp / max(1, n) for lp, n in zip(logprobs, lengths)]
    pred = max(range(len(logprobs)), key=logprobs.__getitem__)  # first on ties, like argmax
    pred_norm = max(range(len(normed)), key=normed.__getitem__)
    return {"pred": pred, "pred_norm": pred_norm,
            "correct": None if answer is None else pred == answer,
            "correct_norm": None if answer is None else pred_norm == answer}


def prepare(tokenizer, raw: Mapping[str, Any] | ScoreItem, max_context: int | None,
            pack_capacity: int | None = None) -> tuple[ScoreItem, EncodedItem]:
    """Validate and tokenize one item (no model needed); BadInput (a ValueError) with the reason."""
    item = check_item(raw)
    return item, encode_item(tokenizer, item, max_context, pack_capacity)


class Scorer(ModelRunner):
    """Holds the model, tokenizer and config; `score(items)` is the whole pipeline."""

    def __init__(self, model, tokenizer, config: ScoreConfig | None = None):
        self.config = config or ScoreConfig()
        super().__init__(model, tokenizer, self.config.onednn_linear, self.config.compile)
        # Switches an sdpa model to prepack_varlen (sdpa for every call but packed prefill).
        self.varlen = self.config.varlen and enable_varlen(model)
        c = self.config
        self.loglik = LoglikConfig(pack_capacity=c.pack_capacity, share=c.mode == "shared", varlen=self.varlen,
                                   max_group_tokens=c.max_group_tokens, max_group_prompts=c.max_group_prompts)

    def warm_up(self) -> None:
        if self.compile:  # one-token continuations (the stream), branches (the tree layout) in one
            pad = self.pad_id  # row and in two: dynamo compiles a dimension of size 1 apart
            for contexts in ((4,), (3, 4)):
                self.loglikelihood([Request([pad] * k, [pad] * n) for k in contexts for n in (1, 2, 3)])

    @on_kernels
    def loglikelihood(self, requests: Sequence[Request]) -> list[Loglik]:
        """lm-eval's (log-likelihood, is_greedy) of token requests, grouped under the budgets (loglik.py)."""
        if self.capability.route != PACKED:  # not on the plain packed path: each request alone (capability.py)
            return unpacked.loglikelihood(self.model, list(requests))
        return loglikelihood(self, requests, self.loglik)

    def rolling_loglikelihood(self, documents: Sequence[list[int]], prefix_token: int,
                              max_length: int) -> list[Loglik]:
        """Each token document's total over lm-eval's disjoint windows of at most `max_length`
        input tokens (loglikelihood_rolling): Loglik(summed log-prob, every token the argmax,
        tokens scored). The windows run through `loglikelihood`, so on the model's route."""
        docs = [rolling_doc(d, prefix_token, max_length) for d in documents]
        flat = self.loglikelihood([w for doc in docs for w in doc.windows])
        out, k = [], 0
        for doc in docs:
            out.append(doc.total(flat[k:k + len(doc.windows)]))
            k += len(doc.windows)
        return out

    def prepare(self, raw: Mapping[str, Any] | ScoreItem) -> tuple[ScoreItem, EncodedItem]:
        """Validate and tokenize one item; BadInput with the reason."""
        return prepare(self.tokenizer, raw, self.max_context, self.config.pack_capacity)

    def score(self, items: Sequence[Mapping[str, Any] | ScoreItem], errors: str = "raise") -> list[ScoreResult]:
        """One result per item, in input order. errors: "raise" (ItemError) | "return" (result.error)."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        results: list[ScoreResult | None] = [None] * len(items)
        checked: list[tuple[int, ScoreItem | BadInput]] = []
        for i, raw in enumerate(items):
            try:
                checked.append((i, check_item(raw)))
            except BadInput as e:
                checked.append((i, e))
        ok = [(i, it) for i, it in checked if isinstance(it, ScoreItem)]
        encoded = dict(zip([i for i, _ in ok], encode_items(self.tokenizer, [it for _, it in ok], self.max_context,
                                                            self.config.pack_capacity)))  # one tokenizer call
        good: list[int] = []
        prepared: list[tuple[ScoreItem, EncodedItem]] = []
        for i, it in checked:
            bad = it if isinstance(it, BadInput) else encoded[i]
            if isinstance(bad, BadInput):
                if errors == "raise":
                    raise ItemError(i, bad.reason, bad.kind) from None
                results[i] = ScoreResult(error=str(bad))
            else:
                good.append(i)
                prepared.append((it, bad))
        for i, r in zip(good, self.score_prepared(prepared)):
            results[i] = r
        return results  # type: ignore[return-value]

    @on_kernels
    def score_prepared(self, prepared: list[tuple[ScoreItem, EncodedItem]]) -> list[ScoreResult]:
        """Score validated, tokenized items group by group; results in input order."""
        if self.capability.route != PACKED:  # not on the plain packed path: each pair alone (capability.py)
            return unpacked.score(self, prepared)
        shared = self.config.mode == "shared"
        sizes = [enc.num_tokens(shared) for _, enc in prepared]
        results: list[ScoreResult | None] = [None] * len(prepared)
        for g in self.groups(sizes):
            for i, r in zip(g, self.score_group([prepared[i] for i in g])):
                results[i] = r
        return results  # type: ignore[return-value]

    def groups(self, sizes: list[int]) -> list[list[int]]:
        """Item indices in groups under the budgets, longest first (similar lengths pack well)."""
        return self.config.groups(sizes)

    def score_group(self, prepared: list[tuple[ScoreItem | None, EncodedItem | RollingDoc]]) -> list[ScoreResult]:
        """One group: its requests (an item's (prompt, choice) pairs, a document's rolling
        windows) through loglik.score_group in one or two passes, then the results per entry."""
        lls, stats = score_group(self, [r for _, enc in prepared for r in requests_of(enc)], self.loglik)
        shared = self.config.mode == "shared"
        out, k = [], 0
        for item, enc in prepared:
            n = len(requests_of(enc))
            tokens = enc.num_tokens(shared)
            out.append(ScoreResult(
                **scores(item, enc, lls[k:k + n], self.config), num_tokens=tokens,
                shared=shared and item is not None and len(item.choices) > 1,
                prefill_s=stats.forward_s * tokens / max(1, stats.tokens), pack_units=stats.units,
                pack_rows=stats.rows, pack_efficiency=stats.efficiency))
            k += n
        return out


def requests_of(enc: EncodedItem | RollingDoc) -> list[Request]:
    """What an entry scores: an item's (prompt, choice) pairs, or a document's rolling windows."""
    if isinstance(enc, RollingDoc):
        return enc.windows
    return [Request(enc.context, c) for c in enc.continuations]


def scores(item: ScoreItem | None, enc: EncodedItem | RollingDoc, lls: list[Loglik], config: ScoreConfig) -> dict:
    """ScoreResult's score fields from the entry's request results: per choice with the
    decisions, or for a document one total (lm-eval's loglikelihood_rolling) over its tokens."""
    if isinstance(enc, RollingDoc):
        t = enc.total(lls)
        return {"choice_logprobs": [t.logprob], "choice_num_tokens": [t.num_tokens], "choice_is_greedy": [t.is_greedy]}
    lps, nts = [r.logprob for r in lls], [r.num_tokens for r in lls]
    return {"choice_logprobs": lps, "choice_num_tokens": nts, "choice_is_greedy": [r.is_greedy for r in lls],
            **decide(lps, nts, item.choices, item.answer, config.length_norm, config.target_delimiter)}


def score(model, tokenizer, items: Sequence[Mapping[str, Any] | ScoreItem], mode: str | None = None,
          config: ScoreConfig | None = None, errors: str = "raise") -> list[ScoreResult]:
    """Score items (dicts with prompt, choices, optional answer); results in input order.

    mode overrides config.mode when given; the default is ScoreConfig's ("shared").
    """
    config = config or ScoreConfig()
    if mode is not None:
        config = replace(config, mode=mode)
    return Scorer(model, tokenizer, config).score(items, errors)


def accuracy(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """Counts and accuracy (both rules) over scored items with an answer."""
    scored = [r for r in results if r.error is None]
    judged = [r for r in scored if r.correct is not None]
    n = len(judged)
    return {"items": len(results), "scored": len(scored), "errors": len(results) - len(scored),
            "judged": n,
            "accuracy": sum(r.correct for r in judged) / n if n else None,
            "accuracy_norm": sum(r.correct_norm for r in judged) / n if n else None}
