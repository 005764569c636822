"""The vectorised per-sequence sampler (SamplingParams: params.py).

Each sequence draws its random numbers from its own generator seeded by its own seed, one
uniform per step, on the CPU. So a sequence's tokens depend only on its logits and its
seed, never on which other prompts share its batch or pack, nor on the device. A prompt
asking for n > 1 completions runs n sequences seeded by `sequence_seeds(seed, n)`.

One step, per sequence, in vLLM's order (HF's processors give the same result):
    raw logits -> min_tokens: EOS and stop_token_ids at -inf until min_tokens are out
               -> repetition penalty (prompt and output tokens), frequency and presence
                  penalties (output tokens, counted per sequence on the device)
               -> argmax (temperature 0) | temperature -> top_k -> top_p -> min_p -> draw
Logprobs are the log_softmax of the raw logits, before any of the above: vLLM's default
(`logprobs_mode="raw_logprobs"`), HF's `output_logits`. The chosen token's entry comes
first, then the top `logprobs` tokens; rank 1 = the most likely token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .params import SamplingParams, sequence_seeds

__all__ = ["Logprob", "Sampler", "SamplingParams", "Step", "expand", "penalize", "sequence_seeds", "warp"]


def random_seed() -> int:
    return int(torch.randint(0, 2**62, ()).item())


def expand(params: list[SamplingParams]) -> tuple[list[SamplingParams], list[int]]:
    """Per-prompt params -> (per-sequence params with n = 1 and their seeds, prompt of each sequence)."""
    seqs, prompt_of = [], []
    for p, sp in enumerate(params):
        if sp.n == 1:
            seqs.append(sp)
        else:
            base = sp.seed if sp.seed is not None else random_seed()
            seqs.extend(replace(sp, n=1, seed=s) for s in sequence_seeds(base, sp.n))
        prompt_of.extend([p] * sp.n)
    return seqs, prompt_of


@dataclass
class Logprob:
    logprob: float  # log-probability under the raw model distribution
    rank: int  # 1 + the number of tokens strictly more likely


@dataclass
class Step:
    tokens: torch.Tensor  # [B] the next token of each sequence
    logprobs: list[dict[int, Logprob] | None] | None  # per sequence (None where not asked); None if none asked


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, V] -> (scaled logits sorted descending with -inf where dropped [B, V], order [B, V]).

    temperature, then top_k, top_p and min_p (HF's warpers, in HF's order). The most likely
    token always stays, so every row keeps a finite entry."""
    sorted_logits, order = (logits / temperature.clamp(min=1e-5)[:, None]).sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))
    # min_p: p / p_max < min_p  <=>  logit < max logit + log(min_p) (log 0 = -inf drops nothing).
    return sorted_logits.masked_fill(sorted_logits < sorted_logits[:, :1] + min_p.log()[:, None], float("-inf")), order


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
             repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties on logits [B, V]. seen [B, V] bool: prompt or output tokens (repetition);
    counts [B, V]: times each token was generated (presence, frequency)."""
    if seen is not None:
        r = repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if counts is not None:
        logits = logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    return logits


class Sampler:
    """One decode step for a batch of sequences; keeps each sequence's state (generator,
    generated count, penalty counts) and drops finished ones with `select`."""

    def __init__(self, params: list[SamplingParams], device: torch.device,
                 prompts: list[list[int]] | None = None, eos_ids: set[int] | frozenset = frozenset()):
        """params: one per sequence (n = 1 each, see `expand`); prompts: each sequence's prompt
        token ids (for repetition_penalty); eos_ids: masked until min_tokens unless ignore_eos."""
        def col(name, dtype=None):
            return torch.tensor([getattr(p, name) for p in params], device=device, dtype=dtype)
        self.temperature, self.top_p, self.top_k, self.min_p = (col(k) for k in ("temperature", "top_p", "top_k", "min_p"))
        self.repetition, self.presence, self.frequency = (
            col(k, torch.float32) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        self.min_tokens = col("min_tokens")
        self.generated = torch.zeros(len(params), dtype=torch.long, device=device)
        self.k = [p.logprobs for p in params]
        self.generators = [torch.Generator().manual_seed(p.seed if p.seed is not None else random_seed())
                           if p.temperature > 0 else None for p in params]
        self._setup = (params, prompts, eos_ids)  # tensors of vocabulary width are built on the first call
        self.seen = self.counts = self.stop_mask = None

    def _start(self, vocab: int) -> None:
        params, prompts, eos_ids = self._setup
        b, device = len(params), self.generated.device
        if any(p.repetition_penalty != 1 for p in params):
            assert prompts is not None and len(prompts) == b, "repetition_penalty needs each sequence's prompt"
            self.seen = _mask(b, vocab, prompts, device)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.counts = torch.zeros(b, vocab, device=device)
        if any(p.min_tokens for p in params):
            self.stop_mask = _mask(b, vocab, [list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(eos_ids))
                                              for p in params], device)
        self._setup = None

    def select(self, keep: torch.Tensor) -> None:
        """Keep the sequences at positions `keep` (finished ones leave the batch)."""
        idx = keep.to(self.generated.device)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition", "presence", "frequency",
                     "min_tokens", "generated", "seen", "counts", "stop_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[idx])
        rows = keep.tolist()
        self.generators = [self.generators[i] for i in rows]
        self.k = [self.k[i] for i in rows]

    def extend(self, other: "Sampler") -> None:
        """The sequences of `other` (already called once: vocabulary-wide state built) join after
        these. A state only one side keeps is zeros on the other, where it has no effect."""
        assert self._setup is None and other._setup is None, "extend after each sampler's first step"
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition", "presence", "frequency",
                     "min_tokens", "generated"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        for name in ("seen", "counts", "stop_mask"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None or b is not None:
                ref = a if a is not None else b
                a = a if a is not None else ref.new_zeros(len(self.k), ref.shape[1])
                b = b if b is not None else ref.new_zeros(len(other.k), ref.shape[1])
                setattr(self, name, torch.cat([a, b]))
        self.generators = self.generators + other.generators
        self.k = self.k + other.k

    def __call__(self, logits: torch.Tensor) -> Step:
        """logits [B, V] -> the next token of each sequence (and its logprobs where asked)."""
        raw = logits.float()
        if self._setup is not None:
            self._start(raw.shape[-1])
        x = raw
        if self.stop_mask is not None:
            x = x.masked_fill(self.stop_mask & (self.generated < self.min_tokens)[:, None], float("-inf"))
        if self.seen is not None or self.counts is not None:
            x = penalize(x, self.seen, self.counts, self.repetition, self.presence, self.frequency)
        tokens = x.argmax(-1)  # [B] greedy
        if any(g is not None for g in self.generators):
            # One uniform per sampling sequence, from its own generator; greedy ones draw nothing.
            u = torch.tensor([float(torch.rand((), generator=g)) if g is not None else 0.0
                              for g in self.generators], device=x.device)  # [B]
            kept, order = warp(x, self.temperature, self.top_k, self.top_p, self.min_p)
            cdf = kept.softmax(-1).cumsum(-1)  # [B, V]
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=x.shape[-1] - 1)
            tokens = torch.where(self.temperature > 0, order.gather(-1, pick).squeeze(-1), tokens)
        step = Step(tokens, self._logprobs(raw, tokens) if any(k is not None for k in self.k) else None)
        if self.seen is not None or self.counts is not None:
            rows = torch.arange(len(tokens), device=tokens.device)
            if self.seen is not None:
                self.seen[rows, tokens] = True
            if self.counts is not None:
                self.counts[rows, tokens] += 1
        self.generated += 1
        return step

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor) -> list[dict[int, Logprob] | None]:
        lp = raw.log_softmax(-1)  # [B, V]
        chosen = lp.gather(-1, tokens[:, None])  # [B, 1]
        rank = ((lp > chosen).sum(-1) + 1).tolist()
        k = min(max(k for k in self.k if k is not None), lp.shape[-1])
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], tokens[:, None][:, :0])  # [B, k]
        out = []
        for b, (tok, c, r, ids, vals) in enumerate(zip(tokens.tolist(), chosen[:, 0].tolist(), rank,
                                                       top_ids.tolist(), top_lp.tolist())):
            if self.k[b] is None:
                out.append(None)
                continue
            d = {tok: Logprob(c, r)}  # the chosen token first, then the top k (vLLM's layout)
            for j in range(self.k[b]):
                d.setdefault(ids[j], Logprob(vals[j], j + 1))
            out.append(d)
        return out


def _mask(b: int, vocab: int, ids: list[list[int]], device) -> torch.Tensor:
    """[b, vocab] bool, True at each row's ids (ids outside the vocabulary are ignored)."""
    mask = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    rows = torch.tensor([r for r, row in enumerate(ids) for _ in row], dtype=torch.long, device=device)
    cols = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)
    ok = cols < vocab
    mask[rows[ok], cols[ok]] = True
    return mask
