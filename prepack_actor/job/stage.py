"""The composable Ray Data stage, in the conventions of `ray.data.llm`.

    from prepack_actor.job import ActorsConfig, ModelConfig, ProcessorConfig, SamplingConfig, build_processor

    processor = build_processor(
        ProcessorConfig(task="generate", model=ModelConfig(path="Qwen/Qwen2.5-0.5B-Instruct"),
                        sampling=SamplingConfig(max_new_tokens=64), actors=ActorsConfig(concurrency=(1, 4))),
        preprocess=lambda row: {"id": row["qid"], "prompt": f"Q: {row['question']}\nA:"},
        postprocess=lambda row: {"qid": row["id"], "answer": row["generated_text"], "error": row["error"]})
    ds = processor(ds)          # lazy, like any Dataset transform; then ds.write_parquet(...) etc.

A row going in has `prompt` (or chat `messages`; score: `prompt`, `choices`, `answer`), and
optionally `id`, `max_new_tokens`, `seed`; every other column is carried through. A row
that cannot be run comes out with `error` and `error_kind`, never dropped. Steps: parse ->
prepare (tokenize, CPU tasks) -> groups by length under the token budget -> actor pool
(packed prefill, decode or scoring) -> output rows (the task's columns + carried ones).
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import ray

from ..capability import PACKED, UnsupportedModel
from ..models import load_tokenizer, preflight, resolve_model_path
from .actor import PrepackActor
from .config import ConfigError, ProcessorConfig
from .faults import FaultPlan
from .oom import token_budget_for_memory
from .rows import (GROUP_SCHEMA, PREPARED_SCHEMA, make_groups, parse_record, rows_to_table, table_to_rows)
from .task import Task, make_task

Row = dict
TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4 (what vLLM's CPU engine preloads)


def parse_stage(batch: pa.Table) -> pa.Table:
    """A user's rows -> parsed rows (rows.ROW_SCHEMA); bad ones carry `error`."""
    return rows_to_table([parse_record(r) for r in batch.to_pylist()])


def prepare_stage(batch: pa.Table, task: Task, model_path: str, trust_remote_code: bool = False) -> pa.Table:
    """Parsed rows -> prepared rows (tokenized, num_input_tokens, payload)."""
    tokenizer, max_context = load_tokenizer(model_path, trust_remote_code)
    return rows_to_table(task.prepare_rows(table_to_rows(batch), tokenizer, max_context), PREPARED_SCHEMA)


def group_stage(batch: pa.Table, max_group_tokens: int, max_group_prompts: int) -> pa.Table:
    """One window of prepared rows -> one record per group (rows.make_groups)."""
    return pa.table(make_groups(table_to_rows(batch), max_group_tokens, max_group_prompts), schema=GROUP_SCHEMA)


def actor_pool(actors, concurrent_batches: int = 1) -> dict:
    """map_batches arguments for the actor pool: size (fixed or autoscaling), resources,
    restarts and retries, calls running at once, the actors' malloc (actors.allocator). A dead
    actor is restarted (max_restarts) and its unfinished groups retried (max_task_retries);
    Ray 2.60 takes both as remote args. Concurrent calls run in threads of one actor
    (engine_loop.py shares its running batch)."""
    c = actors.concurrency
    size = dict(size=c) if isinstance(c, int) else dict(min_size=c[0], max_size=c[1])
    k = concurrent_batches
    args = dict(compute=ray.data.ActorPoolStrategy(**size, max_tasks_in_flight_per_actor=max(actors.max_tasks_in_flight, 2 * k),
                                                   max_concurrent_calls_per_actor=k, enable_true_multi_threading=k > 1),
                num_gpus=actors.gpus_per_actor, num_cpus=actors.cpus_per_actor,
                max_restarts=actors.max_restarts, max_task_retries=actors.max_task_retries)
    if preload := allocator_preload(actors.allocator):  # merged with the job's runtime_env by Ray
        args["runtime_env"] = {"env_vars": {"LD_PRELOAD": preload}}
    return args


def allocator_preload(allocator: str) -> str | None:
    """actors.allocator -> what the actors' LD_PRELOAD gets, or None: tcmalloc under "auto" when
    this machine has it and the user set no LD_PRELOAD of their own (theirs is kept)."""
    if allocator != "auto" or os.environ.get("LD_PRELOAD") or sys.platform != "linux":
        return None
    return TCMALLOC if ctypes.util.find_library("tcmalloc_minimal") else None


def memory_token_budget(config: ProcessorConfig, model_path: str) -> int:
    """packing.max_group_tokens from packing.memory_budget_gb (oom.token_budget_for_memory)."""
    from transformers import AutoConfig
    on_gpu = config.actors.gpus_per_actor > 0 or config.model.device.startswith("cuda")
    dtype = config.model.dtype
    dtype_bytes = {"float32": 4, "fp32": 4}.get(dtype, 2 if dtype != "auto" or on_gpu else 4)
    generate = config.task == "generate"
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    return token_budget_for_memory(model_config, config.packing.memory_budget_gb, dtype_bytes,
                                   config.packing.max_group_prompts,
                                   config.sampling.max_new_tokens if generate else 0, 2 if generate else 0,
                                   running=min(config.packing.max_num_seqs,
                                               config.concurrent_batches * config.packing.max_group_prompts))


class Processor:
    """`processor(ds)`: preprocess -> prepack stages -> postprocess, on the user's Dataset."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                 postprocess: Callable[[Row], Row] | None = None, faults: FaultPlan | None = None):
        model = replace(config.model, cache_dir=str(Path(config.model.cache_dir).resolve()))  # actors' cwd differs
        self.model_path = resolve_model_path(model.path, model.cache_dir)  # tiny:* is built here, once
        load_tokenizer(self.model_path, model.trust_remote_code)  # fails here, before any work, on an unreadable model
        try:  # the route the model takes (capability.py); a refusal fails here, before any work
            self.capability = preflight(self.model_path, model.attn_implementation, model.trust_remote_code)
        except UnsupportedModel as e:
            raise ConfigError(f"model.path {config.model.path!r}: {e}") from None
        if self.capability.route != PACKED:
            print(f"prepack: {self.capability.model_type} runs {self.capability.route}: {self.capability.reason}")
        packing = config.packing
        if packing.memory_budget_gb:
            try:
                packing = replace(packing, max_group_tokens=memory_token_budget(config, self.model_path))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            print(f"packing.max_group_tokens = {packing.max_group_tokens} "
                  f"(from packing.memory_budget_gb={config.packing.memory_budget_gb})")
        self.config = replace(config, model=model, packing=packing)
        self.task = make_task(self.config)
        self.preprocess, self.postprocess = preprocess, postprocess
        self.faults = faults if faults is not None and faults.active else None

    def __call__(self, ds):
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = ds.map_batches(parse_stage, batch_format="pyarrow")
        ds = self.run_parsed(ds)
        return ds.map(self.postprocess) if self.postprocess is not None else ds

    def run_parsed(self, ds, stage_to: dict | None = None, carried: pa.Schema | None = None):
        """Parsed rows (rows.ROW_SCHEMA) -> output rows; the jobs enter here (they parse shards)
        with stage_to=dict(path=..., storage=...): then out come staged files (writer.py).

        carried: the job's carried columns (scan.py), so every output block has one schema;
        None (a user's Dataset) types each block's carried columns from its own values."""
        p = self.config.packing
        # Small blocks: a large shard is tokenized by many tasks, and groups reach the actors
        # (and files the storage) while the rest is still being read.
        ds = ds.repartition(target_num_rows_per_block=256)
        ds = ds.map_batches(prepare_stage, batch_size=256, batch_format="pyarrow",
                            fn_kwargs=dict(task=self.task, model_path=self.model_path,
                                           trust_remote_code=self.config.model.trust_remote_code))
        if p.global_sort:
            ds = ds.sort("num_input_tokens", descending=True)
        ds = ds.map_batches(group_stage, batch_size=p.window, batch_format="pyarrow",
                            fn_kwargs=dict(max_group_tokens=p.max_group_tokens, max_group_prompts=p.max_group_prompts))
        ds = ds.repartition(target_num_rows_per_block=1)  # one group per block: spreads groups over actors
        # One group per call, several calls at once on one running batch (generate); the model
        # loads once per actor.
        return ds.map_batches(PrepackActor, batch_size=1, batch_format="pyarrow",
                              **actor_pool(self.config.actors, self.config.concurrent_batches),
                              fn_constructor_kwargs=dict(config=self.config, stage_to=stage_to, carried=carried,
                                                         faults=self.faults.to_dict() if self.faults else None))


def build_processor(config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """A stage to apply to a Dataset: `ds = build_processor(config, pre, post)(ds)`."""
    return Processor(config, preprocess, postprocess, FaultPlan.from_env())
