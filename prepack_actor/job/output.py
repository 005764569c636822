"""Output modes, resume and exactly-once part files.

    state = prepare_output(path, storage, mode="resume", fmt="parquet", job_info={...})
    state.complete            # summary of a finished job: a re-run is a no-op
    state.done_ids            # ids already written by an earlier, interrupted run
    ds = skip_done(ds, state.done_ids)          # resume: by id
    write_rows(ds, path, "parquet", storage)    # atomic part files named by their ids

Exactly once: every output file holds one group's rows and is named by a hash of their
ids (`part-<sha1>.parquet`), written atomically (storage.write_table_atomic). A group
that Ray retries (actor restart, task retry) rewrites the same name with the same rows,
so it can never appear twice. A resumed run skips the ids found in finished files, so
its new groups hold only other ids. The files themselves are the manifest.

`_job.json` (written first, beside the outputs) records the settings that decide the
rows' content; resume refuses to mix outputs of a different config.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from .config import StorageConfig
from .read import JobError
from .storage import SUMMARY_NAME, filesystem, is_local, read_json, read_output, write_json, write_table_atomic

MODES = ("error_if_exists", "overwrite", "resume")
JOB_INFO_NAME = "_job.json"


@dataclass
class OutputState:
    done_ids: set[str] = field(default_factory=set)  # ids in finished files of an earlier run
    complete: dict | None = None  # the earlier run's summary when it finished (nothing to do)


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def prepare_output(path: str, storage: StorageConfig | None, mode: str, fmt: str,
                   job_info: dict | None = None) -> OutputState:
    """Apply output.mode before any work; fails fast with one line (JobError), a missing
    bucket or no permission too, since it writes `_job.json` first."""
    assert mode in MODES, mode
    try:
        return _prepare_output(path, storage, mode, fmt, job_info)
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - the store's own error: one line
        raise JobError(f"output.path {path!r}: cannot write: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _prepare_output(path: str, storage: StorageConfig | None, mode: str, fmt: str,
                    job_info: dict | None) -> OutputState:
    fs, root = filesystem(path, storage)
    exists = fs.exists(root) and (fs.isfile(root) or bool(fs.ls(root)))
    state = OutputState()
    if exists and mode == "error_if_exists":
        raise JobError(f"output.path {path!r} is not empty (output.mode=overwrite replaces it, "
                          "output.mode=resume finishes an interrupted run)")
    if exists and mode == "overwrite":
        fs.rm(root, recursive=True)
    if exists and mode == "resume":
        old = read_json(_join(path, JOB_INFO_NAME), storage)
        if old is None:
            raise JobError(f"output.path {path!r} is not empty and was not written by this job (no "
                              f"{JOB_INFO_NAME}); use output.mode=overwrite or another output.path")
        if old is not None and job_info is not None and old != job_info:
            diff = sorted(k for k in set(old) | set(job_info) if old.get(k) != job_info.get(k))
            raise JobError(f"output.path {path!r} holds output of a different config ({', '.join(diff)} "
                              "differ); use output.mode=overwrite or another output.path")
        state.complete = read_json(_join(path, SUMMARY_NAME), storage)
        if state.complete is not None:
            return state
        if is_local(fs):  # temp files of writes cut short by the kill
            for p in fs.find(root):
                if posixpath.basename(p).startswith("_tmp-"):
                    fs.rm(p)
        state.done_ids = finished_ids(path, fmt, storage)
    write_json(job_info or {}, _join(path, JOB_INFO_NAME), storage)  # also probes write access
    return state


def finished_ids(path: str, fmt: str, storage: StorageConfig | None = None) -> set[str]:
    ids: set[str] = set()
    for table in read_output(path, fmt, storage, ["id"]):
        ids.update(table.column("id").to_pylist())
    return ids


def part_name(ids: list[str], fmt: str) -> str:
    """A file name fixed by the set of ids it holds (so a retried group replaces itself)."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    return f"part-{digest}.{fmt}"


WRITTEN_SCHEMA = pa.schema([("file", pa.string()), ("num_rows", pa.int64())])


def write_part_stage(batch: pa.Table, path: str, fmt: str, storage: StorageConfig | None) -> pa.Table:
    """Ray Data stage (batch_size=None: one block = one group's rows): write it as one part."""
    if batch.num_rows == 0:
        return WRITTEN_SCHEMA.empty_table()
    name = part_name([str(i) for i in batch.column("id").to_pylist()], fmt)
    write_table_atomic(batch, _join(path, name), fmt, storage)
    return pa.table({"file": [name], "num_rows": [batch.num_rows]}, schema=WRITTEN_SCHEMA)


def skip_done_stage(batch: pa.Table, done_ids) -> pa.Table:
    """Ray Data stage for resume: drop rows whose id is already in a finished file."""
    if not done_ids or batch.num_rows == 0:
        return batch
    keep = [i not in done_ids for i in batch.column("id").to_pylist()]
    return batch.filter(pa.array(keep, type=pa.bool_()))


def skip_done(ds, done_ids: set[str]):
    """Resume: drop rows already written by an earlier run (by id)."""
    return ds.map_batches(skip_done_stage, batch_size=None, batch_format="pyarrow",
                          fn_kwargs=dict(done_ids=done_ids)) if done_ids else ds


def write_rows(ds, path: str, fmt: str, storage: StorageConfig | None = None) -> int:
    """One file per block (one per actor call), written atomically and named by its ids, so
    a retried block replaces its own file (exactly once). Returns rows written.

    Blocks are not combined into bigger files: blocks may differ in carried columns (a
    column absent from a whole group), and one group per file is what makes retries safe.
    """
    written = ds.map_batches(write_part_stage, batch_size=None, batch_format="pyarrow",
                             fn_kwargs=dict(path=path, fmt=fmt, storage=storage))
    return sum(int(b["num_rows"].sum()) for b in written.iter_batches(batch_format="pandas", batch_size=None))
