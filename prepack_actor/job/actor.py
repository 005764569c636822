"""The Ray Data actor for every task: a thin shell over the library (one model load per actor).

    ds.map_batches(PrepackActor, batch_size=1, batch_format="pyarrow",
                   fn_constructor_kwargs=dict(config=processor_config, faults=None),
                   compute=ray.data.ActorPoolStrategy(...), num_gpus=g, num_cpus=c)

Input: group records (rows.GROUP_SCHEMA), one token-bounded group each. Output: one row per
input row (task.output_row). Error rows pass through without touching the model. Generate
calls run in threads, several at once (`actors.max_concurrent_batches`), on one running
batch (engine_loop.EngineLoop): a group's prompts join as others' finish. A group that
fails there, or on its own, is rerun alone (EngineLoop.exclusive) and halved
(oom.run_splitting) until the failure is one row's: out of memory -> an `out_of_memory`
row, any other exception -> an `engine_error` row; the other rows are unaffected.
Anything else that fails while a group's output is built turns that group's rows into
`internal_error` rows: the exception boundary is the row, at worst the group, never the
dataset. `carried` is the job's carried-column
schema (scan.py; None in a user's pipeline). `faults` is the test-only fault plan
(faults.FaultPlan.to_dict()), None in normal runs. `stage_to` (the job) writes each group's
rows to the output's staging folder and returns the staged file instead of the rows.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import torch

from ..engine_loop import EngineLoop
from ..models import load_model, resolve_model_path
from .config import ProcessorConfig
from .faults import FaultPlan
from .oom import is_oom, run_splitting
from .rows import unpack_group
from .task import make_task
from .writer import stage_stage


def actor_device(device: str, gpus_per_actor: float) -> str:
    """"auto" on a CPU actor means cpu, even on a node with GPUs it did not reserve."""
    return "cpu" if device == "auto" and not gpus_per_actor else device


class PrepackActor:
    def __init__(self, config: ProcessorConfig, faults: dict | None = None, stage_to: dict | None = None,
                 carried: pa.Schema | None = None):
        t0 = time.perf_counter()
        if config.actors.torch_threads:
            torch.set_num_threads(config.actors.torch_threads)
        m = config.model
        path = resolve_model_path(m.path, m.cache_dir)
        model, tokenizer = load_model(path, m.dtype, actor_device(m.device, config.actors.gpus_per_actor),
                                      m.attn_implementation, trust_remote_code=m.trust_remote_code)
        self.task = make_task(config)
        self.runner = self.task.runner(model, tokenizer, config.packing)
        self.runner.onednn_linear &= m.onednn_linear  # model.onednn_linear: false keeps torch's F.linear
        self.runner.use_compile(m.compile)
        self.runner.warm_up()  # model.compile: compile here, counted in load_s
        self.loop = EngineLoop(self.runner) if config.task == "generate" else None  # concurrent calls share it
        self.counters = threading.Lock()  # groups_done, load_s: calls run in threads
        self.faults = FaultPlan(**faults) if faults else FaultPlan()
        self.stage_to = stage_to  # the job: stage each group's rows here (writer.py) and return the file
        self.carried = carried
        self.groups_done = 0
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.allocator = allocator()
        self.load_s: float | None = time.perf_counter() - t0  # reported with the first staged group

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        tables = []
        for blob in batch.column("rows").to_pylist():
            with self.counters:
                done, self.groups_done = self.groups_done, self.groups_done + 1
            self.faults.before_group(done)
            rows = unpack_group(blob)
            try:
                tables.append(self.task.to_table(self.run_group(rows), self.carried))
            except Exception as e:  # noqa: BLE001 - our own failure: the group's rows say so, the job goes on
                reason = f"the job failed on this row's group: {type(e).__name__}: {str(e)[:300]}"
                tables.append(self.task.to_table([self.task.output_row(dict(r, carry={}), error=("internal_error", reason))
                                                  for r in rows], self.carried))
        table = pa.concat_tables(tables) if tables else self.task.to_table([], self.carried)
        # Staged here, not by a task after the pool: on a busy cluster such a task waits for a CPU
        # behind the tokenize tasks, and no file reaches storage until the input is read.
        if not self.stage_to:
            return table
        with self.counters:
            load_s, self.load_s = self.load_s or 0.0, None
        return stage_stage(table, **self.stage_to, actor=self.name, load_s=load_s, busy_s=time.perf_counter() - t0,
                           allocator=self.allocator)

    def run_group(self, rows: list[dict]) -> list[dict]:
        """Run the runnable rows of one group; error rows pass through."""
        good = [r for r in rows if r["error"] is None]
        out = [self.task.output_row(r) for r in rows if r["error"] is not None]
        cost = lambda part: sum(r["num_input_tokens"] for r in part)  # noqa: E731
        results = self.run_shared(good, cost)
        if results is None:  # alone, halving until a failure is one row's
            with self.loop.exclusive() if self.loop else nullcontext():
                results = run_splitting(lambda part: self.task.run(self.runner, part), good, cost,
                                        self.faults.before_prefill)
        for r, res in zip(good, results):
            if isinstance(res, BaseException):
                kind = "out_of_memory" if is_oom(res) else "engine_error"
                reason = "does not fit alone" if kind == "out_of_memory" else "the model failed on this row"
                out.append(self.task.output_row(r, error=(kind, f"{reason}: {type(res).__name__}: {res}")))
            else:
                out.append(self.task.output_row(r, res))
        return out

    def run_shared(self, rows: list[dict], cost) -> list | None:
        """The rows on the shared running batch; None when that failed (whoever's row it was)."""
        if not rows or self.loop is None or not self.loop.shared:
            return None
        try:
            self.faults.before_prefill(cost(rows))
            return self.task.run(self.loop, rows)
        except Exception:  # noqa: BLE001 - rerun alone: the verdicts are per row (run_group)
            return None


def allocator() -> str:
    """The malloc this process runs on: "tcmalloc" when preloaded (actors.allocator), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"
