"""Continuous batching: which waiting prompts join the running batch, and the batch's state.

The engine keeps up to `max_num_seqs` sequences decoding. When enough of them finish, the
next waiting prompts are prefilled together in one packed pass and join (Engine.generate;
engine_loop.py keeps one Run across concurrent calls):

    while not run.finished:             # Engine.advance
        if prompts := run.scheduler.admit(run.batch.size):
            engine.join(run, prompts, ids)   # packed prefill, first tokens, into the block cache
        engine.step(run)                # one token for every running sequence

Admission waits until an eighth of the slots are free (or nothing runs), so prefills come
in packs rather than one prompt at a time (a packed pass of k prompts costs far less than
k passes); the last waiting prompts join at once when they all fit (else they would wait
for the batch to drain, then decode alone). Prompts go longest first when sort_by_length,
as the static groups did.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .core.block_cache import BlockCache
from .core.decode import Decoded
from .core.finish import EOS, LENGTH, RUNNING, STOP_ID, Finisher
from .core.sampling import Logprob, Sampler, SamplingParams, Step
from .outputs import Admission, StopText

ADMIT_FRACTION = 8  # admit when at least max_num_seqs // ADMIT_FRACTION slots are free (docs/decode.md)


class Scheduler:
    """The waiting prompts and the rule that admits them (budgets of EngineConfig)."""

    def __init__(self, lengths: list[int], params: list[SamplingParams], max_num_seqs: int,
                 max_group_prompts: int, max_group_tokens: int, sort_by_length: bool = True):
        self.waiting: deque[int] = deque()
        self.lengths: dict[int, int] = {}  # per prompt index (Scheduler.add's)
        self.params: dict[int, SamplingParams] = {}
        self.max_num_seqs, self.max_group_prompts, self.max_group_tokens = max_num_seqs, max_group_prompts, max_group_tokens
        self.sort_by_length, self.added = sort_by_length, 0
        self.add(lengths, params)

    def add(self, lengths: list[int], params: list[SamplingParams]) -> list[int]:
        """New waiting prompts, after those already waiting (longest first among themselves
        when sort_by_length); returns their indices (0, 1, ... across all adds)."""
        idx = list(range(self.added, self.added + len(lengths)))
        self.added += len(lengths)
        self.lengths.update(zip(idx, lengths))
        self.params.update(zip(idx, params))
        self.waiting.extend(sorted(idx, key=lambda i: -self.lengths[i]) if self.sort_by_length else idx)
        return idx

    def forget(self, prompts: list[int]) -> None:
        """Drop finished prompts' entries (a long-lived scheduler: engine_loop.py)."""
        for p in prompts:
            del self.lengths[p], self.params[p]

    def admit(self, running: int) -> list[int]:
        """Prompts to prefill now, given `running` sequences: as many as fit the free slots
        (a prompt takes n) and one packed pass's budgets; [] while too few slots are free."""
        free = self.max_num_seqs - running
        if not self.waiting or free <= 0:
            return []
        if running and free < max(1, self.max_num_seqs // ADMIT_FRACTION) and not self._all_fit(free):
            return []  # too few slots for a pack: wait for more (unless the last prompts all fit now)
        out, seqs, tokens = [], 0, 0
        for p in self.waiting:
            n, length = self.params[p].n, self.lengths[p]
            fits = seqs + n <= free and tokens + length <= self.max_group_tokens and len(out) < self.max_group_prompts
            if not fits and (out or running):  # an oversized prompt still runs, alone, on an empty batch
                break
            out.append(p)
            seqs, tokens = seqs + n, tokens + length
        for _ in out:
            self.waiting.popleft()
        return out

    def _all_fit(self, free: int) -> bool:
        """Every waiting prompt's sequences fit the free slots (waiting for more gains nothing)."""
        return len(self.waiting) <= free and sum(self.params[p].n for p in self.waiting) <= free


@dataclass
class Seq:
    """One running sequence: a prompt's completion `index`, its tokens so far."""
    prompt: int
    index: int
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    text: StopText = field(default_factory=StopText)  # its text so far, for stop strings only


@dataclass
class Batch:
    """The running batch, row b of every field is sequence b."""
    cache: BlockCache
    seqs: list[Seq] = field(default_factory=list)
    sampler: Sampler | None = None
    finisher: Finisher | None = None
    last: torch.Tensor | None = None  # [B] each row's newest token (not yet in the cache)
    positions: torch.Tensor | None = None  # [B] its position

    @property
    def size(self) -> int:
        return len(self.seqs)

    def join(self, seqs: list[Seq], sampler: Sampler, finisher: Finisher, last: torch.Tensor,
             positions: torch.Tensor) -> None:
        """New rows after the running ones (their keys already added to the cache)."""
        if not self.seqs:
            self.seqs, self.sampler, self.finisher, self.last, self.positions = seqs, sampler, finisher, last, positions
            return
        self.seqs = self.seqs + seqs
        self.sampler.extend(sampler)
        self.finisher.extend(finisher)
        self.last, self.positions = torch.cat([self.last, last]), torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep rows `rows` (in order): finished sequences leave; their blocks are freed, not copied."""
        if len(rows) == len(self.seqs):
            return
        idx = torch.tensor(rows, dtype=torch.long)
        self.cache.select(rows)
        self.seqs = [self.seqs[b] for b in rows]
        if rows:
            self.sampler.select(idx)
            self.finisher.select(idx)
            d = idx.to(self.last.device)
            self.last, self.positions = self.last[d], self.positions[d]


@dataclass
class Run:
    """The block path's state: scheduler, running batch and what finished (one generate call,
    or every call in flight of an engine_loop.EngineLoop)."""
    scheduler: Scheduler
    batch: Batch
    admission: dict[int, Admission] = field(default_factory=dict)  # per prompt
    done: dict[int, list] = field(default_factory=dict)  # per prompt: (index, Decoded) as they finish

    @property
    def finished(self) -> bool:
        return not self.scheduler.waiting and not self.batch.seqs

    def retire(self, step: Step, codes: torch.Tensor, rows: range, stops, now: float) -> None:
        """Record `step`'s token for batch rows `rows` (codes [len(rows)]: core/finish.py), then
        the finished sequences leave. stops: the engine's StopChecker, for stop strings only."""
        tokens, codes = torch.stack([step.tokens, codes]).tolist()  # the step's one sync
        keep = list(range(rows.start))
        for j, b in enumerate(rows):
            seq = self.batch.seqs[b]
            seq.tokens.append(tokens[j])
            if seq.logprobs is not None:
                seq.logprobs.append(step.logprobs[j])
            code, stop_at, reason = codes[j], None, tokens[j] if codes[j] == STOP_ID else None
            if seq.params.stop and code in (RUNNING, LENGTH):  # text only for rows with stop strings
                stopped, stop_at, reason = stops.check(seq.tokens, seq.params, seq.text)
                code = EOS if stopped else code
            if code == RUNNING:
                keep.append(b)
                continue
            finish = "length" if code == LENGTH else "stop"
            self.done.setdefault(seq.prompt, []).append(
                (seq.index, Decoded(seq.tokens, finish, stop_at, reason, now, seq.logprobs)))
        self.batch.keep(keep)
