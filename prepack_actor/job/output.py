"""Output modes and incremental resume.

    state = prepare_output(path, storage, mode="resume", fmt="parquet", job_info={...})
    state.done_ids            # ids already in the output (data files and staged groups)
    state.staged              # staging files of an interrupted run: commit them first
    ds = skip_done(ds, state.done_ids)          # resume: by id

Resume is incremental: a re-run processes exactly the ids not yet written, whether the
earlier run finished or not (an input that gained rows gets only the new ones). The files
themselves are the manifest (writer.py has the commit protocol). `_job.json` (written
before any work, beside the outputs) records the settings that decide the rows' content;
resume refuses to mix outputs of a different config and names each differing key.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from .config import StorageConfig
from .lease import LEASE_NAME
from .read import JobError
from .retry import release_retryable
from .storage import SUMMARY_NAME, UnreadableOutput, filesystem, is_local, read_json, read_output, read_table, write_json
from .writer import staged_files

MODES = ("error_if_exists", "overwrite", "resume")
JOB_INFO_NAME = "_job.json"


@dataclass
class OutputState:
    done_ids: set[str] = field(default_factory=set)  # ids already in the output (committed or staged)
    committed: set[str] = field(default_factory=set)  # ids in data files
    staged: list[str] = field(default_factory=list)  # staging files of an interrupted run
    finished_before: bool = False  # the earlier run had completed (its summary existed)
    released: int = 0  # retryable error rows (retry.py) taken out so that this run redoes them


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
    except UnreadableOutput as e:  # a resume must read what is there: name the file
        raise JobError(f"output.path {path!r}: {e}; move it away, or use output.mode=overwrite") from None
    except Exception as e:  # noqa: BLE001 - the store's own error: one line
        raise JobError(f"output.path {path!r}: cannot write: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _prepare_output(path: str, storage: StorageConfig | None, mode: str, fmt: str,
                    job_info: dict | None) -> OutputState:
    fs, root = filesystem(path, storage)
    entries = [p for p in fs.ls(root, detail=False) if posixpath.basename(p.rstrip("/")) != LEASE_NAME] \
        if fs.isdir(root) else []
    exists = fs.exists(root) and (fs.isfile(root) or bool(entries))
    state = OutputState()
    if exists and mode == "error_if_exists":
        raise JobError(f"output.path {path!r} is not empty (output.mode=overwrite replaces it, "
                          "output.mode=resume finishes an interrupted run)")
    if exists and mode == "overwrite":
        if fs.isfile(root) or read_json(_join(path, JOB_INFO_NAME), storage) is None:
            raise JobError(f"output.path {path!r} is not empty and was not written by this job (no "
                           f"{JOB_INFO_NAME}); output.mode=overwrite deletes only a job's own output folder")
        for p in entries:  # everything but this job's lease
            fs.rm(p, recursive=True)
    if exists and mode == "resume":
        old = read_json(_join(path, JOB_INFO_NAME), storage)
        if old is None:
            raise JobError(f"output.path {path!r} is not empty and was not written by this job (no "
                              f"{JOB_INFO_NAME}); use output.mode=overwrite or another output.path")
        if job_info is not None and old != job_info:
            diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed_keys(old, job_info))
            raise JobError(f"output.path {path!r} holds output of other settings ({diff}); "
                           "use output.mode=overwrite or another output.path")
        summary = _join(path, SUMMARY_NAME)
        state.finished_before = read_json(summary, storage) is not None
        if state.finished_before:  # rewritten at the end of this run, over all rows
            fs.rm(filesystem(summary, storage)[1])
        if is_local(fs):  # temp files of writes cut short by the kill
            for p in fs.find(root):
                if posixpath.basename(p).startswith("_tmp-"):
                    fs.rm(p)
        state.released = release_retryable(path, fmt, storage)  # their ids run again
        state.committed = finished_ids(path, fmt, storage)
        state.staged = staged_files(path, storage)
        state.done_ids = state.committed | _ids(state.staged, storage)
    write_json(job_info or {}, _join(path, JOB_INFO_NAME), storage)  # also probes write access
    return state


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every setting that differs."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _ids(files: list[str], storage: StorageConfig | None) -> set[str]:
    return {i for f in files for i in read_table(f, "parquet", storage, ["id"]).column("id").to_pylist()}


def done_ids(path: str, fmt: str, storage: StorageConfig | None = None) -> set[str]:
    """Every id a resumed run will not redo: in data files, or in staged groups of a killed run."""
    return finished_ids(path, fmt, storage) | _ids(staged_files(path, storage), storage)


def finished_ids(path: str, fmt: str, storage: StorageConfig | None = None) -> set[str]:
    ids: set[str] = set()
    for table in read_output(path, fmt, storage, ["id"]):
        ids.update(table.column("id").to_pylist())
    return ids


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
