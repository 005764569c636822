"""Generate completions for every row under input.path with a pool of prepacking actors.

    python jobs/generate.py                                  # bundled sample, tiny llama, local Ray
    python jobs/generate.py --config conf/my.yaml input.path=s3://bucket/prompts/ sampling.max_new_tokens=64
    ray job submit --working-dir . -- python jobs/generate.py input.path=... output.path=...

Stages: config -> read (parse, bad rows -> error rows) -> tokenize -> length-aware groups
-> actor pool (pack, prefill, decode) -> write -> summary.json. See conf/generate.yaml.
Faults (docs/failure.md): output.mode picks error_if_exists | overwrite | resume; dead
actors are restarted and their groups redone; every group is one atomic file named by its
ids, so each row is written exactly once; summary.json is written last, only on success.
"""
from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import ray  # noqa: E402

from prepack_actor.config import GenerateConfig, config_or_exit, to_dict  # noqa: E402
from prepack_actor.dataset import (InputError, actor_device, actor_pool, list_shards, prepare_output, read_output,  # noqa: E402
                                   read_rows, skip_done, start_ray, write_json, write_rows)
from prepack_actor.actor import PrepackActor  # noqa: E402
from prepack_actor.faults import FaultPlan  # noqa: E402
from prepack_actor.model_source import resolve_model_path  # noqa: E402
from prepack_actor.oom import token_budget_for_memory  # noqa: E402
from prepack_actor.stages import group_stage, load_tokenizer, tokenize_stage  # noqa: E402
from prepack_actor.summary import SUMMARY_COLUMNS, SummaryAccumulator, format_table  # noqa: E402

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "conf" / "generate.yaml"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def memory_token_budget(cfg: GenerateConfig, model_path: str) -> int:
    from transformers import AutoConfig
    on_gpu = cfg.actors.gpus_per_actor > 0 or cfg.model.device.startswith("cuda")
    dtype_bytes = {"float32": 4, "fp32": 4}.get(cfg.model.dtype, 2 if cfg.model.dtype != "auto" or on_gpu else 4)
    return token_budget_for_memory(AutoConfig.from_pretrained(model_path), cfg.packing.memory_budget_gb,
                                   dtype_bytes, cfg.packing.max_rows, cfg.sampling.max_new_tokens)


def main(argv: list[str]) -> dict:
    # 1. Config: schema <- YAML <- key=value; everything checked before any work.
    cfg = config_or_exit(GenerateConfig, argv, DEFAULT_YAML)
    input_path = cfg.input.path or str(resources.files("prepack_actor") / "data" / "sample_prompts.jsonl")
    try:
        fs, shards = list_shards(input_path, cfg.input.format, cfg.storage)
    except InputError as e:
        fail(str(e))
    try:  # fail fast on an unreadable model, before Ray starts
        model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        load_tokenizer(model_path)
    except Exception as e:  # noqa: BLE001 - any cause is one line for the user
        fail(f"model.path {cfg.model.path!r}: cannot load: {type(e).__name__}: {str(e).splitlines()[0]}")
    # output.mode: error_if_exists | overwrite | resume (fails fast: a missing bucket too).
    job_info = {k: v for k, v in to_dict(cfg).items() if k in ("model", "input", "sampling", "prompts")}
    job_info["output_format"] = cfg.output.format
    try:
        state = prepare_output(cfg.output.path, cfg.storage, cfg.output.mode, cfg.output.format, job_info)
    except InputError as e:
        fail(str(e))
    if state.complete is not None:
        print(f"output.path {cfg.output.path!r} is already complete ({state.complete.get('rows_out')} rows, "
              "summary.json present): nothing to do")
        return state.complete
    if state.done_ids:
        print(f"resuming: {len(state.done_ids)} rows already written under {cfg.output.path!r}")
    token_budget = cfg.packing.token_budget
    if cfg.packing.memory_budget_gb:  # token budget from a memory budget (prepack_actor/oom.py)
        try:
            token_budget = memory_token_budget(cfg, model_path)
        except ValueError as e:
            fail(str(e))
        print(f"packing.token_budget = {token_budget} (from packing.memory_budget_gb={cfg.packing.memory_budget_gb})")
    t0 = time.perf_counter()
    try:
        start_ray(cfg.actors)  # joins `ray job submit`'s cluster, else a local Ray
    except InputError as e:
        fail(str(e))

    # 2. Read: one task per shard, every line or record becomes a row (bad ones carry `error`).
    ds, counter = read_rows(fs, shards)
    ds = skip_done(ds, state.done_ids)  # resume: rows already in finished files are not redone

    # 3. Tokenize (CPU tasks), optionally sort globally, then cut token-bounded groups.
    ds = ds.map_batches(tokenize_stage, batch_size=256, batch_format="pyarrow", fn_kwargs=dict(
        model_path=model_path, max_new_tokens=cfg.sampling.max_new_tokens, base_seed=cfg.sampling.seed,
        over_long=cfg.prompts.over_long, max_prompt_tokens=cfg.prompts.max_prompt_tokens))
    if cfg.packing.global_sort:
        ds = ds.sort("num_input_tokens", descending=True)
    ds = ds.map_batches(group_stage, batch_size=cfg.packing.window, batch_format="pyarrow", fn_kwargs=dict(
        token_budget=token_budget, max_rows=cfg.packing.max_rows))
    ds = ds.repartition(target_num_rows_per_block=1)  # one group per block: spreads groups over actors

    faults = FaultPlan.from_env()  # test-only fault injection (PREPACK_FAULT_*), off by default
    # 4. Actor pool: one group per call; the model loads once per actor. A dead actor is
    #    restarted (max_restarts) and its unfinished groups are retried (max_task_retries).
    ds = ds.map_batches(
        PrepackActor, batch_size=1, batch_format="pyarrow", **actor_pool(cfg.actors),
        fn_constructor_kwargs=dict(
            model_path=cfg.model.path, model_cache_dir=str(Path(cfg.model.cache_dir).resolve()),
            dtype=cfg.model.dtype, device=actor_device(cfg.model.device, cfg.actors.gpus_per_actor),
            attn_implementation=cfg.model.attn_implementation, pack_capacity=cfg.packing.capacity,
            token_budget=token_budget, max_rows=cfg.packing.max_rows,
            temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
            stop=list(cfg.sampling.stop), ignore_eos=cfg.sampling.ignore_eos,
            torch_threads=cfg.actors.torch_threads, faults=faults.to_dict() if faults.active else None))

    # 5. Write (streams through the whole pipeline): one atomic file per group, named by its ids.
    write_rows(ds, cfg.output.path, cfg.output.format, cfg.storage)
    wall_s = time.perf_counter() - t0

    # 6. Summary: read back only the small columns of what was written.
    acc = SummaryAccumulator()
    for table in read_output(cfg.output.path, cfg.output.format, cfg.storage, list(SUMMARY_COLUMNS)):
        acc.add(table.to_pydict())
    rows_in = sum(ray.get(counter.get.remote()).values())
    summary = acc.finish(rows_in=rows_in, wall_s=wall_s, model=cfg.model.path, model_path=model_path,
                         input=input_path, output=cfg.output.path, num_shards=len(shards),
                         rows_reused=len(state.done_ids), config=to_dict(cfg))
    print(format_table(summary))
    if summary["rows_out"] != rows_in:  # no summary.json: the output is not a finished job
        fail(f"rows out ({summary['rows_out']}) != rows in ({rows_in})")
    write_json(summary, f"{cfg.output.path.rstrip('/')}/summary.json", cfg.storage)  # last, atomic
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
