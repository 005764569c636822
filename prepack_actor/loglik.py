"""Log-likelihood requests with the least work that gives lm-evaluation-harness's numbers.

    results = loglikelihood(runner, [Request(ctx_ids, cont_ids), ...], LoglikConfig())
    results[0].logprob, results[0].is_greedy          # lm-eval's (float, bool) per request

A request asks for sum log p(cont | ctx) and whether every continuation token is the argmax
(lm-eval `HFLM._loglikelihood_tokens`). What is laid out:
- one packed unit per distinct context (requests sharing a context share its tokens);
- a continuation's first token is read from the context's last-token logits, so a
  single-token continuation costs nothing beyond its context (MMLU: 4 choices, 1 context);
- a longer continuation `c` is a branch `c[:-1]` of its context (its last token is a target,
  never an input), positions continuing from the context's; identical branches are laid once;
- units are packed across requests with no padding: on varlen attention a unit with at most
  one branch is one contiguous causal segment of a single stream (core/attention.py); units
  with sibling branches take the tree mask (core/masks.py), which cu_seqlens cannot express.
The LM head runs only at the slots that predict a target; log_softmax at those in fp32.

`rolling_requests` chunks a whole document into disjoint windows exactly as lm-eval's
`loglikelihood_rolling` does (utils.get_rolling_token_windows + make_disjoint_window).
No lm_eval import here: the library does not need it installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .core.forward import target_logprobs
from .core.grouping import GroupConfig
from .core.packing import PackedBatch, pack


@dataclass
class Request:
    context: list[int]  # >= 1 tokens (lm-eval puts the prefix token there for an empty context)
    continuation: list[int]  # >= 1 tokens, scored


@dataclass
class Loglik:
    logprob: float  # sum of the continuation tokens' log-probs
    is_greedy: bool  # every continuation token is the argmax
    num_tokens: int  # continuation tokens


@dataclass
class LoglikConfig(GroupConfig):
    share: bool = True  # one unit per distinct context | False: one unit per request (the paper's layout)
    varlen: bool = True  # one unpadded stream on varlen attention where the model allows it
    max_group_prompts: int = 1024  # units per forward pass, >= 1
    max_group_tokens: int = 8192  # tokens laid out per forward pass (bounds memory), >= 1


@dataclass
class GroupStats:
    units: int  # packed units (distinct contexts, or requests without sharing)
    rows: int  # packed rows over the group's forward passes
    tokens: int  # tokens laid out
    efficiency: float  # tokens / slots, in (0, 1]
    forward_s: float  # time in the model


@dataclass
class Plan:
    """Requests -> units: contexts, their distinct branches, and each request's (unit, branch)."""

    contexts: list[list[int]]
    branches: list[list[list[int]]]  # per unit, distinct continuation[:-1] of length >= 1
    where: list[tuple[int, int]]  # per request (unit, branch index or -1 for a single token)

    @property
    def sizes(self) -> list[int]:
        return [len(c) + sum(len(b) for b in bs) for c, bs in zip(self.contexts, self.branches)]


def plan(requests: Sequence[Request], share: bool = True) -> Plan:
    contexts: list[list[int]] = []
    branches: list[list[list[int]]] = []
    unit_of: dict[tuple, int] = {}
    branch_of: list[dict[tuple, int]] = []
    where = []
    for i, r in enumerate(requests):
        assert r.context and r.continuation, f"request {i}: empty context or continuation"
        key = tuple(r.context) if share else i
        u = unit_of.get(key)
        if u is None:
            u = unit_of[key] = len(contexts)
            contexts.append(list(r.context))
            branches.append([])
            branch_of.append({})
        b = -1
        if len(r.continuation) > 1:
            head = tuple(r.continuation[:-1])
            b = branch_of[u].get(head, -1)
            if b < 0:
                b = branch_of[u][head] = len(branches[u])
                branches[u].append(list(head))
        where.append((u, b))
    return Plan(contexts, branches, where)


def loglikelihood(runner, requests: Sequence[Request], config: LoglikConfig | None = None) -> list[Loglik]:
    """One Loglik per request, in input order, grouped under the config's budgets."""
    config = config or LoglikConfig()
    p = plan(requests, config.share)
    members: list[list[int]] = [[] for _ in p.contexts]  # requests of each unit
    for i, (u, _) in enumerate(p.where):
        members[u].append(i)
    out: list[Loglik | None] = [None] * len(requests)
    for g in config.groups(p.sizes):
        idx = [i for u in g for i in members[u]]
        for i, r in zip(idx, score_group(runner, [requests[i] for i in idx], config)[0]):
            out[i] = r
    return out  # type: ignore[return-value]


@torch.inference_mode()
def score_group(runner, requests: Sequence[Request], config: LoglikConfig) -> tuple[list[Loglik], GroupStats]:
    """Score requests in as few forward passes as the layout allows (one or two), no grouping."""
    p = plan(requests, config.share)
    varlen = config.varlen and getattr(runner, "varlen", False)
    # On varlen, units with sibling branches need the tree mask: a second, dense pass.
    tree = [u for u, bs in enumerate(p.branches) if len(bs) > 1] if varlen else list(range(len(p.contexts)))
    in_tree = set(tree)
    chain = [u for u in range(len(p.contexts)) if u not in in_tree]
    sums = torch.zeros(len(requests), dtype=torch.float64)
    misses = torch.zeros(len(requests), dtype=torch.long)
    rows = slots_total = tokens = 0
    forward_s = 0.0
    for units, stream in ((chain, True), (tree, False)):
        if not units:
            continue
        batch, ctx_last, branch_start = _layout(p, units, stream, config.pack_capacity, runner.pad_id)
        slot, target, req = _targets(p, requests, units, ctx_last, branch_start)
        t0 = runner.now()
        with runner.kernels():
            lp, greedy = target_logprobs(runner.model, batch, slot, target, varlen=stream)  # [T] each
        forward_s += runner.now() - t0
        sums.index_add_(0, req, lp.double())
        misses.index_add_(0, req, (~greedy).long())
        rows += batch.num_rows
        slots_total += batch.input_ids.numel()
        tokens += batch.num_tokens
    results = [Loglik(float(s), int(m) == 0, len(r.continuation))
               for s, m, r in zip(sums.tolist(), misses.tolist(), requests)]
    return results, GroupStats(len(p.contexts), rows, tokens, tokens / max(1, slots_total), forward_s)


def _layout(p: Plan, units: list[int], stream: bool, capacity: int | None,
            pad_id: int) -> tuple[PackedBatch, dict[int, int], dict[tuple[int, int], int]]:
    """Pack `units`; returns the batch, each unit's last context slot and each branch's first slot (flat)."""
    if stream:  # at most one branch per unit: context + branch is one causal segment
        prompts = [p.contexts[u] + (p.branches[u][0] if p.branches[u] else []) for u in units]
        batch = pack(prompts, pad_id=pad_id, stream=True)
    else:
        batch = pack([p.contexts[u] for u in units], capacity, pad_id, [p.branches[u] for u in units])
    start = (batch.row * batch.width + batch.offset).tolist()  # [P] flat first slot of each unit
    ctx_last = {u: start[k] + len(p.contexts[u]) - 1 for k, u in enumerate(units)}
    branch_start: dict[tuple[int, int], int] = {}
    if stream:
        for u in units:
            if p.branches[u]:
                branch_start[(u, 0)] = ctx_last[u] + 1
    else:
        flat = (batch.row[batch.branch_unit] * batch.width + batch.branch_offset).tolist()  # [B]
        k = 0
        for u in units:
            for j in range(len(p.branches[u])):
                branch_start[(u, j)] = flat[k]
                k += 1
    return batch, ctx_last, branch_start


def _targets(p: Plan, requests: Sequence[Request], units: list[int], ctx_last: dict[int, int],
             branch_start: dict[tuple[int, int], int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every continuation token of the requests on `units`: (slot predicting it, token, request), [T] each.

    Token 0 is predicted at the context's last slot, token t >= 1 at branch slot t - 1.
    """
    chosen = set(units)
    slot: list[int] = []
    target: list[int] = []
    req: list[int] = []
    for i, (r, (u, b)) in enumerate(zip(requests, p.where)):
        if u not in chosen:
            continue
        n = len(r.continuation)
        slot.append(ctx_last[u])
        if n > 1:
            s = branch_start[(u, b)]
            slot.extend(range(s, s + n - 1))
        target.extend(r.continuation)
        req.extend([i] * n)
    return torch.tensor(slot), torch.tensor(target), torch.tensor(req)


def rolling_requests(tokens: list[int], prefix_token: int, max_length: int) -> list[Request]:
    """A document's disjoint windows as requests, exactly as lm-eval's loglikelihood_rolling
    (get_rolling_token_windows(context_len=1) + make_disjoint_window): the first window is
    conditioned on `prefix_token`, each later one on the tokens before it; every token is
    scored once; the input of each window is at most `max_length` tokens."""
    assert max_length >= 1
    if not tokens:
        return []
    out: list[Request] = []
    first = min(max_length, len(tokens))
    out.append(Request([prefix_token], tokens[:first]))  # window 1: prefix + tokens[:first - 1] as input
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)  # window_pred_len
        end = predicted + n
        window = tokens[end - max_length - 1:end]  # context_len = 1: input tokens[end - max_length - 1 : end - 1]
        ctx, cont = window[:-n], window[-n:]  # make_disjoint_window
        out.append(Request(ctx, cont))
        predicted = end
    return out


@dataclass
class RollingDoc:
    """A whole document as lm-eval's loglikelihood_rolling scores it: its disjoint windows."""
    windows: list[Request]  # rolling_requests of the document's tokens
    length: int  # the document's tokens, each scored once

    def num_tokens(self, shared: bool = True) -> int:
        """Tokens laid out: each window's input (context + continuation but its last token)."""
        return sum(len(w.context) + len(w.continuation) - 1 for w in self.windows)

    def total(self, windows: Sequence[Loglik]) -> Loglik:
        """The document's result from its windows' results (in order): the summed log-prob
        (lm-eval's loglikelihood_rolling), every token the argmax, its token count."""
        return Loglik(sum(r.logprob for r in windows), all(r.is_greedy for r in windows), self.length)


def rolling_doc(tokens: list[int], prefix_token: int, max_length: int) -> RollingDoc:
    return RollingDoc(rolling_requests(tokens, prefix_token, max_length), len(tokens))
