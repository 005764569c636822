"""Ray-side reading and writing of row datasets through fsspec (local paths, s3://, ...).

    fs, shards = list_shards("s3://bucket/prompts/", "auto", storage)   # fails fast (InputError)
    ds, counter = read_rows(fs, shards)         # Dataset in stages.ROW_SCHEMA; bad lines -> error rows
    state = prepare_output(path, storage, "resume", "parquet", job_info)   # output.mode; fails fast
    ds = skip_done(ds, state.done_ids)                                     # resume: by id
    write_rows(ds, path, "parquet", storage)    # atomic part files named by their ids
    table = read_output(path, "parquet", storage, columns=[...])       # pyarrow only, no Ray
    write_json(summary, f"{path}/summary.json", storage)

JSONL shards are read as bytes (`ray.data.read_binary_files`) and parsed line by line,
because `read_json` fails the whole job on one malformed line. S3 credentials and
endpoint come from the standard AWS env vars or StorageConfig.
"""
from __future__ import annotations

import posixpath

import fsspec
import pyarrow as pa
import ray

from .config import StorageConfig
from .resume import OutputError, OutputState, skip_done_stage, write_part_stage
from .resume import prepare_output as _prepare_output
from .rows import parse_jsonl_shard, parse_parquet_shard
from .stages import ROW_SCHEMA, rows_to_table
from .storage import (EXTENSIONS, SUMMARY_NAME, arrow_fs, filesystem, output_files,  # noqa: F401 - re-exported
                      read_output, write_json)


class InputError(ValueError):
    """A missing, empty or unreadable input path; the message is one line for the user."""


def _format_of(name: str) -> str | None:
    for fmt, exts in EXTENSIONS.items():
        if name.endswith(exts):
            return fmt
    return None


def list_shards(path: str, fmt: str = "auto", storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]:
    """Every data file under a file, directory or glob -> (fs, [(path, format)]), sorted."""
    try:
        fs, root = filesystem(path, storage)
        if any(c in root for c in "*?["):
            files = [p for p in fs.glob(root) if fs.isfile(p)]
        elif fs.isfile(root):
            files = [root]
        elif fs.isdir(root):
            files = [p for p in fs.find(root) if not posixpath.basename(p).startswith(("_", "."))
                     and posixpath.basename(p) != SUMMARY_NAME]
        else:
            raise InputError(f"input.path {path!r}: no such file or directory")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line
        raise InputError(f"input.path {path!r}: cannot list: {type(e).__name__}: {e}") from None
    shards = []
    for f in sorted(files):
        shard_fmt = fmt if fmt != "auto" else _format_of(f)
        if shard_fmt is not None and (fmt == "auto" or len(files) == 1 or _format_of(f) in (fmt, None)):
            shards.append((f, shard_fmt))
    if not shards:
        raise InputError(f"input.path {path!r}: no {'jsonl or parquet' if fmt == 'auto' else fmt} files found")
    if all(fs.size(f) == 0 for f, _ in shards):
        raise InputError(f"input.path {path!r}: input is empty")
    return fs, shards


def shard_names(shards: list[tuple[str, str]]) -> dict[str, str]:
    """Shard path -> short name for derived ids and messages (path relative to the common root)."""
    paths = [p for p, _ in shards]
    common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return {p: posixpath.relpath(p, common) if common else p for p in paths}


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows parsed per shard (rows_in for the summary, without a second read)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, shard: str, n: int) -> None:
        self.counts[shard] = self.counts.get(shard, 0) + n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def _parse_stage(batch: pa.Table, names: dict[str, str], formats: dict[str, str], counter) -> pa.Table:
    rows = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        name = names.get(path, path)
        parse = parse_parquet_shard if formats.get(path) == "parquet" else parse_jsonl_shard
        parsed = parse(data, name)
        if counter is not None:
            counter.add.remote(name, len(parsed))
        rows.extend(parsed)
    return rows_to_table(rows)


def read_rows(fs: fsspec.AbstractFileSystem, shards: list[tuple[str, str]], count: bool = True):
    """(Dataset of parsed rows in ROW_SCHEMA, RowCounter handle or None). One task per shard."""
    names = shard_names(shards)
    counter = RowCounter.remote() if count else None
    ds = ray.data.read_binary_files([p for p, _ in shards], filesystem=arrow_fs(fs), include_paths=True,
                                    override_num_blocks=len(shards))
    ds = ds.map_batches(_parse_stage, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(names=names, formats=dict(shards), counter=counter))
    return ds, counter


def prepare_output(path: str, storage: StorageConfig | None = None, mode: str | bool = "error_if_exists",
                   fmt: str = "parquet", job_info: dict | None = None) -> OutputState:
    """Apply output.mode (error_if_exists | overwrite | resume; a bool means overwrite or not)
    before any work; raises InputError with one line (a missing bucket, no permission too)."""
    mode = {True: "overwrite", False: "error_if_exists"}.get(mode, mode) if isinstance(mode, bool) else mode
    try:
        return _prepare_output(path, storage, mode, fmt, job_info)
    except OutputError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the store's own error: one line
        raise InputError(f"output.path {path!r}: cannot write: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def skip_done(ds, done_ids: set[str]):
    """Resume: drop rows already written by an earlier run (by id)."""
    return ds.map_batches(skip_done_stage, batch_size=None, batch_format="pyarrow",
                          fn_kwargs=dict(done_ids=done_ids)) if done_ids else ds


def write_rows(ds, path: str, fmt: str, storage: StorageConfig | None = None) -> int:
    """One file per block (one per actor call), written atomically and named by its ids, so
    a retried block replaces its own file (exactly once; see `resume`). Returns rows written.

    Blocks are not combined into bigger files: blocks may differ in carried columns (a
    column absent from a whole group), and one group per file is what makes retries safe.
    """
    written = ds.map_batches(write_part_stage, batch_size=None, batch_format="pyarrow",
                             fn_kwargs=dict(path=path, fmt=fmt, storage=storage))
    return sum(int(b["num_rows"].sum()) for b in written.iter_batches(batch_format="pandas", batch_size=None))



def start_ray(actors) -> None:
    """Join the cluster (RAY_ADDRESS, set by `ray job submit`) or start a local Ray, then
    check that the actor pool fits it (raises InputError)."""
    if not ray.is_initialized():
        ray.init()
    check_actor_fit(actors.num_actors, actors.cpus_per_actor, actors.gpus_per_actor)


def actor_pool(actors) -> dict:
    """map_batches arguments for an actor pool: size, resources, restarts and retries.

    A dead actor is restarted (max_restarts) and its unfinished groups retried
    (max_task_retries); Ray 2.60 takes both as remote args.
    """
    return dict(compute=ray.data.ActorPoolStrategy(size=actors.num_actors,
                                                   max_tasks_in_flight_per_actor=actors.max_tasks_in_flight),
                num_gpus=actors.gpus_per_actor, num_cpus=actors.cpus_per_actor,
                max_restarts=actors.max_restarts, max_task_retries=actors.max_task_retries)


def actor_device(device: str, gpus_per_actor: float) -> str:
    """"auto" on a CPU actor means cpu, even on a node with GPUs it did not reserve."""
    return "cpu" if device == "auto" and not gpus_per_actor else device


def check_actor_fit(num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse an actor pool that would starve Ray Data's own tasks (the job would hang).

    CPU actors that reserve every CPU of the cluster leave none for the read, tokenize and
    write tasks, and Ray Data waits for them forever. GPU pools larger than the cluster may
    still be satisfied by an autoscaler, so they only warn.
    """
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if num_actors * cpus_per_actor >= cpus:
        raise InputError(
            f"actors.num_actors={num_actors} x actors.cpus_per_actor={cpus_per_actor:g} reserve all "
            f"{cpus:g} CPUs of the cluster; the read and tokenize tasks need at least one free CPU. "
            f"Lower actors.num_actors or actors.cpus_per_actor (fractions such as 0.5 are allowed)")
    if gpus_per_actor and num_actors * gpus_per_actor > gpus:
        print(f"warning: actors.num_actors={num_actors} x actors.gpus_per_actor={gpus_per_actor:g} "
              f"need more than the {gpus:g} GPUs the cluster has now; waiting for more to join")
