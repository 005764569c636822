"""The one job pipeline, for every task: preflight, read, the stage, write, summary.

    summary = run(cfg)               # cfg: GenerateConfig | ScoreJobConfig (conf/*.yaml); JobError on failure
    run(cfg, dry_run=True)           # preflight, then prepare and print the first rows; writes nothing

Faults (docs/failure.md): one job per output path (lease.py); input and output paths checked
(paths.py); a pre-pass counts rows, finds repeated ids and types carried columns (scan.py);
output.mode picks error_if_exists | overwrite | resume (only ids not yet written run, and
retryable error rows again); dead actors are restarted and their groups redone; groups are
staged, then committed into sized data files exactly once (writer.py); _summary.json last.
"""
from __future__ import annotations

import os
import time
from importlib import resources

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers in forked Ray workers
import ray  # noqa: E402

from .carry import CARRIED_NAME, carried_conflicts, carried_record  # noqa: E402
from .config import ConfigError  # noqa: E402
from .config_file import to_dict  # noqa: E402
from .faults import FaultPlan  # noqa: E402
from .lease import LeaseError, acquire_lease  # noqa: E402
from .output import prepare_output, skip_done  # noqa: E402
from .paths import path_conflict  # noqa: E402
from .read import JobError, list_shards, read_rows, shard_names, start_ray  # noqa: E402
from .rows import RETRYABLE_KINDS  # noqa: E402
from .scan import scan_input  # noqa: E402
from .stage import Processor  # noqa: E402
from .storage import SUMMARY_NAME, read_json, read_output, write_json  # noqa: E402
from .summary import SummaryAccumulator, format_table  # noqa: E402
from .task import make_task  # noqa: E402
from .writer import Committer  # noqa: E402


def run(cfg, dry_run: bool = False) -> dict | None:
    pcfg = cfg.processor()
    # 1. Preflight, before Ray starts: input listed, paths safe, model readable.
    input_path = cfg.input.path or str(resources.files("prepack_actor") / "data" / make_task(pcfg).sample)
    fs, shards = list_shards(input_path, cfg.input.format, cfg.storage)
    problem = path_conflict(input_path, cfg.output.path, cfg.output.mode, cfg.storage)
    if problem:
        raise JobError(problem)
    try:
        processor = Processor(pcfg, faults=FaultPlan.from_env())  # test-only faults (PREPACK_FAULT_*), off by default
    except ConfigError as e:  # e.g. packing.memory_budget_gb too small for this model
        raise JobError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. a missing or broken checkpoint
        raise JobError(_model_error(cfg, e)) from None
    if dry_run:
        return dry_run_rows(fs, shards, processor, cfg.input.limit)
    try:  # one job per output path (lease.py), held until the end whatever happens
        lease = acquire_lease(cfg.output.path, cfg.storage, cfg.output.lease_s)
    except LeaseError as e:
        raise JobError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - no bucket, no permission: one line
        raise JobError(f"output.path {cfg.output.path!r}: cannot write: {type(e).__name__}: {e}") from None
    try:
        return _run(cfg, processor, input_path, fs, shards, lease)
    except LeaseError as e:
        raise JobError(str(e)) from None
    finally:
        lease.release()


def _run(cfg, processor: Processor, input_path: str, fs, shards, lease) -> dict:
    t_start = time.perf_counter()
    task = processor.task
    start_ray(cfg.actors)  # joins `ray job submit`'s cluster, else a local Ray; checks the pool fits

    # 2. Scan: rows per shard, repeated ids, the carried columns' one schema (scan.py).
    scan = scan_input(fs, shards, shard_names(shards), set(task.output_schema.names))
    if scan.num_repeats:
        print(f"input: {scan.num_repeats} rows repeat an earlier row's id; written as <id>#<k> "
              f"({'duplicate_id error rows' if cfg.input.duplicate_ids == 'error' else 'and run'}: "
              f"input.duplicate_ids={cfg.input.duplicate_ids})")
    carried_file = f"{cfg.output.path.rstrip('/')}/{CARRIED_NAME}"
    before = read_json(carried_file, cfg.storage) if cfg.output.mode == "resume" else None
    conflicts = carried_conflicts(before, scan.sigs)
    if conflicts:  # the files written so far would not share one schema with the new ones
        raise JobError(f"output.path {cfg.output.path!r} holds rows whose carried columns had other types "
                       f"({'; '.join(conflicts)}): the input changed; use output.mode=overwrite or another output.path")

    settings = to_dict(cfg)
    job_info = {k: v for k, v in settings.items() if k in task.job_keys}
    if task.name == "score":  # a pair wider than a row is an error row: the capacity decides content
        job_info["packing.pack_capacity"] = settings["packing"]["pack_capacity"]
    job_info["input"].pop("limit", None)  # a try-out on the first rows may be continued in full
    job_info["model"].pop("trust_remote_code", None)  # permission, not content
    job_info["output_format"] = cfg.output.format  # resume refuses outputs of other settings
    state = prepare_output(cfg.output.path, cfg.storage, cfg.output.mode, cfg.output.format, job_info)
    write_json(carried_record(scan.sigs, before), carried_file, cfg.storage)
    if state.released:
        print(f"resuming: {state.released} rows that failed for a cause that can pass "
              f"({', '.join(RETRYABLE_KINDS)}) run again")
    if state.done_ids:
        print(f"resuming: {len(state.done_ids)} rows already written under {cfg.output.path!r} "
              f"({'a finished run' if state.finished_before else 'an interrupted run'}); only other ids run")
    t0 = time.perf_counter()
    out = cfg.output
    committer = Committer(out.path, out.format, cfg.storage, out.rows_per_file, out.file_mb, state.committed)
    for f in state.staged:  # finished groups of an interrupted run: commit them first
        committer.add(f)

    # 3. Read: one task per shard, every line or record becomes a row (bad ones carry `error`).
    ds = read_rows(fs, shards, scan.repeats, cfg.input.duplicate_ids, processor.faults)
    if cfg.input.limit:  # the first N rows in shard order (a try-out run)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ds.limit(cfg.input.limit)
    ds = skip_done(ds, state.done_ids)  # resume: rows already in finished files are not redone

    # 4. The stage: prepare (tokenize) -> length-aware groups -> actor pool (stage.py).
    # 5. Write while it runs: each actor stages its group's rows; the driver commits data files of
    #    output.rows_per_file rows / output.file_mb as groups finish (writer.py: exactly once).
    ds = processor.run_parsed(ds, stage_to=dict(path=out.path, storage=cfg.storage), carried=scan.carried)
    progress, cost = Progress(), Cost(start_s=t0 - t_start)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        lease.check()  # another job took the path over: stop before committing more
        for f, size in zip(batch.column("file").to_pylist(), batch.column("num_bytes").to_pylist()):
            committer.add(f, size)
        cost.add(batch)
        progress.update(committer)
    lease.check()
    committer.finish()
    wall_s = time.perf_counter() - t0

    # 6. Summary: read back only the small columns of what was written.
    acc = SummaryAccumulator(task.summary_columns)
    for table in read_output(cfg.output.path, cfg.output.format, cfg.storage, acc.columns()):
        acc.add(table.to_pydict())
    rows_in = min(scan.rows_in, cfg.input.limit) if cfg.input.limit else scan.rows_in
    summary = acc.finish(task, rows_in=rows_in, wall_s=wall_s, model=cfg.model.path,
                         model_path=processor.model_path, input=input_path, output=cfg.output.path,
                         num_shards=len(shards), rows_reused=len(state.done_ids),
                         rows_new=acc.rows_out - len(state.done_ids), rows_retried=state.released,
                         duplicate_ids=scan.num_repeats, files_written=committer.files_written,
                         first_file_s=committer.first_file_s, engine_path=processor.capability.route,
                         capability=processor.capability.as_dict(),
                         **cost.summary(wall_s, acc.totals.get("choice_logprobs")), config=to_dict(cfg))
    print(format_table(summary, task.headline))
    if summary["rows_out"] != rows_in:  # no _summary.json: the output is not a finished job
        raise JobError(f"rows out ({summary['rows_out']}) != rows in ({rows_in})")
    lease.check()
    write_json(summary, f"{cfg.output.path.rstrip('/')}/{SUMMARY_NAME}", cfg.storage)  # last, atomic
    return summary


class Cost:
    """The job's fixed cost apart from its throughput, from the actors' account of each group.

    start_s: Ray start, input scan and output checks before the stage runs (driver);
    load_s: the slowest actor's model load; busy_s: actor time in groups (all actors);
    allocators: the malloc the actors run on ("tcmalloc" | "system", actors.allocator);
    fixed_s: start_s + wall_s less busy_s per actor, i.e. what a longer run does not repeat;
    steady_pairs_per_s (scoring): (prompt, choice) pairs / busy_s per actor.
    """

    def __init__(self, start_s: float):
        self.start_s, self.load_s, self.busy_s, self.actors, self.allocators = start_s, 0.0, 0.0, set(), set()

    def add(self, batch) -> None:
        self.actors.update(a for a in batch.column("actor").to_pylist() if a)
        self.allocators.update(a for a in batch.column("allocator").to_pylist() if a)
        self.load_s = max([self.load_s, *batch.column("load_s").to_pylist()])
        self.busy_s += sum(batch.column("busy_s").to_pylist())

    def summary(self, wall_s: float, pairs: float | None = None) -> dict:
        actors = max(1, len(self.actors))
        per_actor = self.busy_s / actors
        out = {"start_s": round(self.start_s, 3), "load_s": round(self.load_s, 3), "busy_s": round(self.busy_s, 3),
               "actors": len(self.actors), "allocators": sorted(self.allocators),
               "fixed_s": round(max(0.0, self.start_s + wall_s - per_actor), 3)}
        if pairs is not None:
            out.update(pairs=int(pairs), steady_pairs_per_s=round(pairs / per_actor, 2) if per_actor > 0 else None)
        return out


class Progress:
    """One line every `every_s` seconds: rows committed, files, rows/s (Ray's own bar counts blocks)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.t0 = every_s, time.perf_counter()
        self.last = self.t0

    def update(self, committer: Committer) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rows = committer.rows_written + committer._pending_rows()
            print(f"progress: {rows} rows done, {committer.rows_written} in {committer.files_written} files, "
                  f"{rows / (now - self.t0):.1f} rows/s", flush=True)


def dry_run_rows(fs, shards, processor: Processor, limit: int = 0, n: int = 5) -> None:
    """Parse and prepare the first rows of the first shard, print them; no Ray, no writes."""
    from ..models import load_tokenizer
    from .read import parse_shard, shard_names
    path, fmt = shards[0]
    data = fs.cat_file(path) if fmt == "parquet" else fs.cat_file(path, start=0, end=1 << 20)
    if fmt != "parquet" and len(data) == 1 << 20:
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
    rows = parse_shard(data, shard_names(shards)[path], fmt)[: min(n, limit or n)]
    tokenizer, max_context = load_tokenizer(processor.model_path, processor.config.model.trust_remote_code)
    print(f"dry run: {len(shards)} shard(s), model {processor.model_path}, task {processor.task.name}; "
          f"the first {len(rows)} rows of {path}:")
    for r in processor.task.prepare_rows(rows, tokenizer, max_context):
        what = f"error {r['error_kind']}: {r['error']}" if r["error"] else f"{r['num_input_tokens']} tokens"
        print(f"  {r['id'] if len(r['id']) <= 60 else r['id'][:57] + '...'}: {what}")
    print("dry run: config, input and model are usable; nothing was written")


def _model_error(cfg, e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    if "trust_remote_code" in str(e):  # transformers refused a checkpoint with its own code
        return (f"model.path {cfg.model.path!r} contains custom code (its config names Python classes to run); "
                "refused: set model.trust_remote_code=true to run it, only for a checkpoint you trust")
    return f"model.path {cfg.model.path!r}: cannot load: {type(e).__name__}: {first}"
