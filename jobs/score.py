"""Score every multiple-choice row under input.path by log-likelihood with prepacking actors.

    python jobs/score.py                                     # bundled 40 MMLU items, tiny llama, local Ray
    python jobs/score.py input.path=/data/mmlu.jsonl scoring.mode=simple output.format=jsonl
    ray job submit --working-dir . -- python jobs/score.py input.path=... output.path=...

Rows: {id, prompt, choices: [str, ...], answer?: int}. Out: per row choice_logprobs,
choice_num_tokens, pred, pred_norm, correct (null without answer), timing and packing
columns, error. Stages: config -> read (bad rows -> error rows) -> validate + tokenize +
length-aware groups -> actor pool (pack, one forward, sums) -> write -> summary.json.
"""
from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import ray  # noqa: E402

from prepack_actor.config import config_or_exit, to_dict  # noqa: E402
from prepack_actor.dataset import (InputError, actor_device, actor_pool, list_shards, prepare_output, read_output,  # noqa: E402
                                   read_rows, skip_done, start_ray, write_json, write_rows)
from prepack_actor.model_source import resolve_model_path  # noqa: E402
from prepack_actor.score_actor import ScoreActor  # noqa: E402
from prepack_actor.scoring_config import ScoreJobConfig  # noqa: E402
from prepack_actor.scoring_rows import SUMMARY_COLUMNS, ScoreSummary, group_stage  # noqa: E402
from prepack_actor.stages import load_tokenizer  # noqa: E402
from prepack_actor.summary import format_table  # noqa: E402

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "conf" / "score.yaml"
HEADLINE = ("model", "output", "rows_in", "rows_out", "rows_ok", "rows_error", "errors_by_kind", "judged",
            "accuracy", "accuracy_norm", "tokens_in", "wall_s", "tokens_per_s", "prefill_tokens_per_s",
            "mean_pack_efficiency")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> dict:
    # 1. Config: schema <- YAML <- key=value; everything checked before any work.
    cfg = config_or_exit(ScoreJobConfig, argv, DEFAULT_YAML)
    input_path = cfg.input.path or str(resources.files("prepack_actor") / "data" / "sample_scoring.jsonl")
    try:
        fs, shards = list_shards(input_path, cfg.input.format, cfg.storage)
        model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        load_tokenizer(model_path)  # fail fast on an unreadable model, before Ray
        job_info = {k: v for k, v in to_dict(cfg).items() if k in ("model", "input", "scoring")}
        job_info["output_format"] = cfg.output.format  # resume refuses outputs of other settings
        state = prepare_output(cfg.output.path, cfg.storage, cfg.output.mode, cfg.output.format,
                               job_info)  # docs/failure.md
    except (InputError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - e.g. a missing or broken checkpoint
        fail(f"model.path {cfg.model.path!r}: cannot load tokenizer: {type(e).__name__}: {str(e).splitlines()[0]}")
    if state.complete is not None:
        print(f"output.path {cfg.output.path!r} is already complete (summary.json present): nothing to do")
        return state.complete
    t0 = time.perf_counter()
    try:
        start_ray(cfg.actors)  # joins `ray job submit`'s cluster, else a local Ray
    except InputError as e:
        fail(str(e))

    # 2. Read: one task per shard, every line or record becomes a row (bad ones carry `error`).
    ds, counter = read_rows(fs, shards)
    ds = skip_done(ds, state.done_ids)  # output.mode=resume: ids already written are not redone

    # 3. Validate choices/answer, tokenize (harness rule), cut token-bounded groups (CPU tasks).
    ds = ds.map_batches(group_stage, batch_size=cfg.packing.window, batch_format="pyarrow", fn_kwargs=dict(
        model_path=model_path, mode=cfg.scoring.mode, pack_capacity=cfg.packing.capacity,
        token_budget=cfg.packing.token_budget, max_rows=cfg.packing.max_rows))
    ds = ds.repartition(target_num_rows_per_block=1)  # one group per block: spreads groups over actors

    # 4. Actor pool: one group per call, one forward per group; the model loads once per actor.
    #    A dead actor is restarted (max_restarts) and its unfinished groups retried (max_task_retries).
    ds = ds.map_batches(
        ScoreActor, batch_size=1, batch_format="pyarrow", **actor_pool(cfg.actors),
        fn_constructor_kwargs=dict(
            model_path=cfg.model.path, model_cache_dir=str(Path(cfg.model.cache_dir).resolve()),
            dtype=cfg.model.dtype, device=actor_device(cfg.model.device, cfg.actors.gpus_per_actor),
            attn_implementation=cfg.model.attn_implementation, mode=cfg.scoring.mode,
            length_norm=cfg.scoring.length_norm, pack_capacity=cfg.packing.capacity,
            token_budget=cfg.packing.token_budget, torch_threads=cfg.actors.torch_threads))

    # 5. Write (streams through the whole pipeline).
    write_rows(ds, cfg.output.path, cfg.output.format, cfg.storage)
    wall_s = time.perf_counter() - t0

    # 6. Summary: read back only the small columns of what was written.
    acc = ScoreSummary()
    for table in read_output(cfg.output.path, cfg.output.format, cfg.storage, list(SUMMARY_COLUMNS)):
        acc.add(table.to_pydict())
    rows_in = sum(ray.get(counter.get.remote()).values())
    summary = acc.finish(rows_in=rows_in, wall_s=wall_s, model=cfg.model.path, model_path=model_path,
                         input=input_path, output=cfg.output.path, num_shards=len(shards),
                         rows_reused=len(state.done_ids), config=to_dict(cfg))
    print(format_table(summary, HEADLINE))
    if summary["rows_out"] != rows_in:
        fail(f"rows out ({summary['rows_out']}) != rows in ({rows_in})")
    write_json(summary, f"{cfg.output.path.rstrip('/')}/summary.json", cfg.storage)  # last, atomic
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
