"""Reading shards into a row Dataset through fsspec (local paths, s3://, ...), and Ray start-up.

    fs, shards = list_shards("s3://bucket/prompts/", "auto", storage)   # fails fast (JobError)
    start_ray(actors)                           # joins the cluster, else a local Ray; checks the pool fits
    ds = read_rows(fs, shards, scan.repeats, "error")   # Dataset in rows.ROW_SCHEMA; bad lines -> error rows

JSONL shards are read as bytes (`ray.data.read_binary_files`) and parsed line by line,
because `read_json` fails the whole job on one malformed line. S3 credentials and
endpoint come from the standard AWS env vars or StorageConfig.
"""
from __future__ import annotations

import os
import posixpath
import tempfile

import fsspec
import pyarrow as pa
import ray

from .config import ActorsConfig, StorageConfig
from .faults import FaultPlan
from .rows import mark_repeat, parse_jsonl_shard, parse_parquet_shard, rows_to_table
from .storage import EXTENSIONS, SUMMARY_NAME, arrow_fs, filesystem


class JobError(ValueError):
    """A job that cannot start (input, output, model, cluster); the message is one line for the user."""


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
            raise JobError(f"input.path {path!r}: no such file or directory")
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line
        raise JobError(f"input.path {path!r}: cannot list: {type(e).__name__}: {e}") from None
    shards = []
    for f in sorted(files):
        shard_fmt = fmt if fmt != "auto" else _format_of(f)
        if shard_fmt is not None and (fmt == "auto" or len(files) == 1 or _format_of(f) in (fmt, None)):
            shards.append((f, shard_fmt))
    if not shards:
        raise JobError(f"input.path {path!r}: no {'jsonl or parquet' if fmt == 'auto' else fmt} files found")
    if all(fs.size(f) == 0 for f, _ in shards):
        raise JobError(f"input.path {path!r}: input is empty")
    return fs, shards


def shard_names(shards: list[tuple[str, str]]) -> dict[str, str]:
    """Shard path -> short name for derived ids and messages (path relative to the common root)."""
    paths = [p for p, _ in shards]
    common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return {p: posixpath.relpath(p, common) if common else p for p in paths}


def parse_shard(data: bytes, name: str, fmt: str) -> list[dict]:
    return (parse_parquet_shard if fmt == "parquet" else parse_jsonl_shard)(data, name)


def _parse_stage(batch: pa.Table, names: dict[str, str], formats: dict[str, str],
                 repeats: dict[str, dict[int, tuple[int, str]]], policy: str, faults: dict | None) -> pa.Table:
    if faults:
        FaultPlan(**faults).in_parse()
    rows = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        parsed = parse_shard(data, names.get(path, path), formats.get(path, "jsonl"))
        for i, (k, first) in repeats.get(path, {}).items():  # ids an earlier row has (scan.py)
            mark_repeat(parsed[i], k, first, policy)
        rows.extend(parsed)
    return rows_to_table(rows)


def read_rows(fs: fsspec.AbstractFileSystem, shards: list[tuple[str, str]],
              repeats: dict[str, dict[int, tuple[int, str]]] | None = None, policy: str = "error",
              faults: FaultPlan | None = None):
    """Dataset of parsed rows in ROW_SCHEMA, one task per shard. `repeats` (scan.py) names the
    rows whose id an earlier row has; `policy` is input.duplicate_ids. Rows are counted by
    the scan, not here: a retried task here cannot change a count."""
    ds = ray.data.read_binary_files([p for p, _ in shards], filesystem=arrow_fs(fs), include_paths=True,
                                    override_num_blocks=len(shards))
    return ds.map_batches(_parse_stage, batch_size=1, batch_format="pyarrow",
                          fn_kwargs=dict(names=shard_names(shards), formats=dict(shards), repeats=repeats or {},
                                         policy=policy, faults=faults.to_dict() if faults else None))


def start_ray(actors: ActorsConfig) -> None:
    """Join the cluster (RAY_ADDRESS, set by `ray job submit`) or start a local Ray, then
    check that the actor pool fits it (raises JobError)."""
    if ray.is_initialized():
        how = "using the Ray this process already started"
    else:
        # A bare ray.init() joins RAY_ADDRESS, else the cluster a `ray start` on this machine last
        # started (its address file), else starts a private one: say which, so nobody is surprised.
        joins = os.environ.get("RAY_ADDRESS") or os.path.exists(os.path.join(tempfile.gettempdir(), "ray",
                                                                              "ray_current_cluster"))
        ray.init()
        how = "joined the Ray cluster" if joins else "started a private local Ray"
    res = ray.cluster_resources()
    print(f"ray: {how} at {ray.get_runtime_context().gcs_address} ({len(ray.nodes())} node(s), "
          f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs)")
    size = actors.concurrency if isinstance(actors.concurrency, int) else actors.concurrency[0]
    check_actor_fit(size, actors.cpus_per_actor, actors.gpus_per_actor)
    wait_for_placement(size, actors.cpus_per_actor, actors.gpus_per_actor, actors.placement_timeout_s)


def check_actor_fit(num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse an actor pool that would starve Ray Data's own tasks (the job would hang).

    CPU actors that reserve every CPU of the cluster leave none for the read, tokenize and
    write tasks, and Ray Data waits for them forever. Pools that need more than the cluster
    has now may still be placed once an autoscaler adds nodes: wait_for_placement decides.
    """
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if num_actors * cpus_per_actor >= cpus:
        raise JobError(
            f"actors.concurrency={num_actors} x actors.cpus_per_actor={cpus_per_actor:g} reserve all "
            f"{cpus:g} CPUs of the cluster; the read and tokenize tasks need at least one free CPU. "
            f"Lower actors.concurrency or actors.cpus_per_actor (fractions such as 0.5 are allowed)")
    if gpus_per_actor and num_actors * gpus_per_actor > gpus:
        print(f"actors.concurrency={num_actors} x actors.gpus_per_actor={gpus_per_actor:g} need more than the "
              f"{gpus:g} GPUs the cluster has now; waiting for them (actors.placement_timeout_s)")


def wait_for_placement(num_actors: int, cpus_per_actor: float, gpus_per_actor: float, timeout_s: float) -> None:
    """Reserve the pool's resources once (a placement group of one bundle per actor, each
    bundle on one node), then free them: a pool the cluster cannot place within timeout_s
    fails here with one line, instead of Ray Data waiting for it forever."""
    from ray.util.placement_group import placement_group, remove_placement_group
    bundle = {"CPU": cpus_per_actor, **({"GPU": gpus_per_actor} if gpus_per_actor else {})}
    pg = placement_group([bundle] * num_actors, strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        res, free = ray.cluster_resources(), ray.available_resources()
        raise JobError(
            f"the cluster cannot place the actor pool: actors.concurrency={num_actors} x "
            f"(actors.cpus_per_actor={cpus_per_actor:g} CPU, actors.gpus_per_actor={gpus_per_actor:g} GPU) on "
            f"{sum(n['Alive'] for n in ray.nodes())} node(s) with {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs "
            f"({free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs free) after "
            f"actors.placement_timeout_s={timeout_s:g}; lower the request, add nodes, or wait longer")
