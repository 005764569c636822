"""Generate completions for every row under input.path with a pool of prepacking actors.

    python jobs/generate.py                                  # bundled sample, tiny llama, local Ray
    python jobs/generate.py --config conf/my.yaml input.path=s3://bucket/prompts/ sampling.max_new_tokens=64
    ray job submit --working-dir . -- python jobs/generate.py input.path=... output.path=...

Stages: config -> read (parse, bad rows -> error rows) -> tokenize -> length-aware groups
-> actor pool (pack, prefill, decode) -> write -> summary.json. See conf/generate.yaml.
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
from prepack_actor.dataset import (InputError, list_shards, prepare_output, read_output,  # noqa: E402
                                   read_rows, write_json, write_rows)
from prepack_actor.actor import PrepackActor  # noqa: E402
from prepack_actor.model_source import resolve_model_path  # noqa: E402
from prepack_actor.stages import group_stage, load_tokenizer, tokenize_stage  # noqa: E402
from prepack_actor.summary import SUMMARY_COLUMNS, SummaryAccumulator, format_table  # noqa: E402

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "conf" / "generate.yaml"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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
    try:
        prepare_output(cfg.output.path, cfg.storage, cfg.output.overwrite)
    except Exception as e:  # noqa: BLE001 - e.g. no permission on the bucket
        fail(str(e) if isinstance(e, InputError) else f"output.path {cfg.output.path!r}: {e}".splitlines()[0])
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) joins a cluster; else a local Ray

    # 2. Read: one task per shard, every line or record becomes a row (bad ones carry `error`).
    ds, counter = read_rows(fs, shards)

    # 3. Tokenize (CPU tasks), optionally sort globally, then cut token-bounded groups.
    ds = ds.map_batches(tokenize_stage, batch_size=256, batch_format="pyarrow", fn_kwargs=dict(
        model_path=model_path, max_new_tokens=cfg.sampling.max_new_tokens, base_seed=cfg.sampling.seed,
        over_long=cfg.prompts.over_long, max_prompt_tokens=cfg.prompts.max_prompt_tokens))
    if cfg.packing.global_sort:
        ds = ds.sort("num_input_tokens", descending=True)
    ds = ds.map_batches(group_stage, batch_size=cfg.packing.window, batch_format="pyarrow", fn_kwargs=dict(
        token_budget=cfg.packing.token_budget, max_rows=cfg.packing.max_rows))
    ds = ds.repartition(target_num_rows_per_block=1)  # one group per block: spreads groups over actors

    # 4. Actor pool: one group per call; the model loads once per actor.
    ds = ds.map_batches(
        PrepackActor, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors.num_actors,
                                           max_tasks_in_flight_per_actor=cfg.actors.max_tasks_in_flight),
        num_gpus=cfg.actors.gpus_per_actor, num_cpus=cfg.actors.cpus_per_actor,
        fn_constructor_kwargs=dict(
            model_path=cfg.model.path, model_cache_dir=str(Path(cfg.model.cache_dir).resolve()),
            # "auto" on a CPU actor means cpu, even on a node with GPUs it did not reserve.
            dtype=cfg.model.dtype, device="cpu" if cfg.model.device == "auto" and not cfg.actors.gpus_per_actor
            else cfg.model.device,
            attn_implementation=cfg.model.attn_implementation, pack_capacity=cfg.packing.capacity,
            token_budget=cfg.packing.token_budget, max_rows=cfg.packing.max_rows,
            temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
            stop=list(cfg.sampling.stop), ignore_eos=cfg.sampling.ignore_eos,
            torch_threads=cfg.actors.torch_threads))

    # 5. Write (streams through the whole pipeline).
    write_rows(ds, cfg.output.path, cfg.output.format, cfg.storage)
    wall_s = time.perf_counter() - t0

    # 6. Summary: read back only the small columns of what was written.
    acc = SummaryAccumulator()
    for table in read_output(cfg.output.path, cfg.output.format, cfg.storage, list(SUMMARY_COLUMNS)):
        acc.add(table.to_pydict())
    rows_in = sum(ray.get(counter.get.remote()).values())
    summary = acc.finish(rows_in=rows_in, wall_s=wall_s, model=cfg.model.path, model_path=model_path,
                         input=input_path, output=cfg.output.path, num_shards=len(shards), config=to_dict(cfg))
    write_json(summary, f"{cfg.output.path.rstrip('/')}/summary.json", cfg.storage)
    print(format_table(summary))
    if summary["rows_out"] != rows_in:
        fail(f"rows out ({summary['rows_out']}) != rows in ({rows_in})")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
