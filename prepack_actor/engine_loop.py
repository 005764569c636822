"""One running batch shared by concurrent generate calls (ray.data.llm's engine shape).

    loop = EngineLoop(engine)
    results = loop.generate_ids(ids, params)   # from any thread; returns when its prompts finish

A call's prompts join one long-lived scheduler (Scheduler.add) and a background thread turns
the engine's main loop (Engine.advance: admit, packed prefill, one decode step) while any call
has work. So the running batch is refilled from whichever call has waiting prompts and never
drains between calls: the job's actor runs several groups at once
(`actors.max_concurrent_batches`) and keeps `max_num_seqs` sequences decoding, as vLLM's
engine does under ray.data.llm. Outputs do not depend on who shares the batch (each prompt
equals itself alone; seeds are per row).

Failure: an exception in an admission or a step fails every call in flight with it and the
running batch is dropped. A caller that wants its own rows' verdicts retries them alone
inside `exclusive()` (the job: oom.run_splitting), which pauses the loop meanwhile, so one
bad prompt never marks another call's rows.

Models off the shared path (not the packed route, or no block decode: Engine.block_decode)
run each call whole inside `exclusive()`, one at a time.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .capability import PACKED
from .core.sampling import SamplingParams
from .engine import Engine
from .outputs import GenerationResult
from .scheduler import Run


@dataclass
class Call:
    prompts: list[int]  # the scheduler's indices of this call's prompts, in call order
    start: float  # hand-over time (queue_s and ttft_s count from it)
    future: Future


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        # The shared batch needs the block decode of the packed route; others run call by call.
        self.shared = engine.capability.route == PACKED and engine.block_decode
        self.cond = threading.Condition()  # guards pending, calls, paused
        self.lock = threading.Lock()  # held while the model runs: one turn, or an exclusive() block
        self.pending: list[tuple[list[list[int]], list[SamplingParams], Call]] = []
        self.calls: list[Call] = []
        self.paused = 0  # exclusive() blocks waiting or running
        self.ids: dict[int, list[int]] = {}  # token ids of the prompts in flight
        self.run: Run | None = None
        self.thread: threading.Thread | None = None

    def generate_ids(self, ids: list[list[int]], params: list[SamplingParams],
                     start: float | None = None) -> list[GenerationResult]:
        """Engine.generate_ids, sharing the running batch with other threads' calls."""
        start = self.engine.now() if start is None else start
        if not self.shared:
            with self.exclusive():
                return self.engine.generate_ids(ids, params, start)
        return self.submit(ids, params, start).result()

    def submit(self, ids: list[list[int]], params: list[SamplingParams], start: float) -> Future:
        """Queue a call; its future gets one result per prompt in input order (or the exception)."""
        call = Call([], start, Future())
        if not ids:
            call.future.set_result([])
            return call.future
        with self.cond:
            self.pending.append((ids, params, call))
            if self.thread is None:
                self.thread = threading.Thread(target=self.serve, name="prepack-engine-loop", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        return call.future

    @contextmanager
    def exclusive(self):
        """The engine to the caller alone: the loop pauses between turns until the block ends."""
        with self.cond:
            self.paused += 1
        try:
            with self.lock:
                yield self.engine
        finally:
            with self.cond:
                self.paused -= 1
                self.cond.notify_all()

    def serve(self) -> None:
        """The background thread: take new calls, turn the main loop, hand back finished calls."""
        while True:
            with self.cond:
                while self.paused or not (self.pending or self.calls):
                    self.cond.wait()
                new, self.pending = self.pending, []
            with self.lock:
                try:
                    self.turn(new)
                except BaseException as e:  # noqa: BLE001 - every call in flight gets it; the loop goes on
                    self.fail(e)

    @torch.inference_mode()
    def turn(self, new: list) -> None:
        e = self.engine
        self.calls += [call for _, _, call in new]  # first: a failure below reaches them too
        with e.kernels():
            for ids, params, call in new:
                if self.run is None:
                    self.run = e.new_run([], [])
                call.prompts = self.run.scheduler.add([len(x) for x in ids], params)
                self.ids.update(zip(call.prompts, ids))
            if self.run is None:
                return
            e.advance(self.run, self.ids)
        self.hand_back()

    def hand_back(self) -> None:
        """Results of the calls whose every prompt finished; an idle run is dropped (frees its cache)."""
        run, s = self.run, self.run.scheduler
        for call in [c for c in self.calls if all(len(run.done.get(p, ())) == s.params[p].n for p in c.prompts)]:
            results = [self.engine.result(self.ids[p], run.admission[p], run.done[p], call.start) for p in call.prompts]
            for p in call.prompts:
                del self.ids[p], run.done[p], run.admission[p]
            s.forget(call.prompts)
            self.calls.remove(call)
            call.future.set_result(results)
        if run.finished:
            self.run = None

    def fail(self, error: BaseException) -> None:
        for call in self.calls:
            call.future.set_exception(error)
        self.calls, self.ids, self.run = [], {}, None
