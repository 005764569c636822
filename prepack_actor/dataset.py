"""Ray-side reading and writing of row datasets through fsspec (local paths, s3://, ...).

    fs, shards = list_shards("s3://bucket/prompts/", "auto", storage)   # fails fast (InputError)
    ds, counter = read_rows(fs, shards)         # Dataset in stages.ROW_SCHEMA; bad lines -> error rows
    prepare_output(path, storage, overwrite=True)
    write_rows(ds, path, "parquet", storage)
    table = read_output(path, "parquet", storage, columns=[...])       # pyarrow only, no Ray
    write_json(summary, f"{path}/summary.json", storage)

JSONL shards are read as bytes (`ray.data.read_binary_files`) and parsed line by line,
because `read_json` fails the whole job on one malformed line. S3 credentials and
endpoint come from the standard AWS env vars or StorageConfig.
"""
from __future__ import annotations

import json
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from .config import StorageConfig
from .rows import parse_jsonl_shard, parse_parquet_shard
from .stages import ROW_SCHEMA, rows_to_table

SUMMARY_NAME = "summary.json"  # written beside the output shards; never read as one
EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet", ".pq")}


class InputError(ValueError):
    """A missing, empty or unreadable input path; the message is one line for the user."""


def filesystem(path: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without protocol) with S3 options from config or env."""
    storage = storage or StorageConfig()
    protocol = fsspec.core.split_protocol(path)[0]
    opts: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", storage.region)) if v}
        opts = {"anon": storage.anon, "client_kwargs": client}
    fs, root = fsspec.core.url_to_fs(path, **opts)
    return fs, root


def arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view Ray Data reads and writes through (the same fsspec object, picklable)."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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


def prepare_output(path: str, storage: StorageConfig | None = None, overwrite: bool = True) -> None:
    """Clear (overwrite) or check (no overwrite) the output directory before any work."""
    fs, root = filesystem(path, storage)
    if fs.exists(root) and (fs.isfile(root) or fs.ls(root)):
        if not overwrite:
            raise InputError(f"output.path {path!r} is not empty (set output.overwrite=true)")
        fs.rm(root, recursive=True)


def write_rows(ds, path: str, fmt: str, storage: StorageConfig | None = None) -> None:
    """Parquet or JSON-lines shards under path, one file per block (one per actor call).

    Blocks are not combined into bigger files: blocks may differ in carried columns (a
    column absent from a whole group) and Ray's writer fails to concatenate those.
    """
    fs, root = filesystem(path, storage)
    fs.makedirs(root, exist_ok=True)
    if fmt == "parquet":
        ds.write_parquet(root, filesystem=arrow_fs(fs))
    else:
        assert fmt == "jsonl", fmt
        ds.write_json(root, filesystem=arrow_fs(fs))


def output_files(path: str, fmt: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, root = filesystem(path, storage)
    return fs, sorted(p for p in fs.find(root)
                      if p.endswith(EXTENSIONS[fmt]) and posixpath.basename(p) != SUMMARY_NAME)


def read_output(path: str, fmt: str, storage: StorageConfig | None = None, columns: list[str] | None = None):
    """Iterate a job's output as pyarrow tables, one per file (only `columns` when given)."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq
    fs, files = output_files(path, fmt, storage)
    for f in files:
        with fs.open(f, "rb") as fh:
            if fmt == "parquet":
                table = pq.read_table(fh, columns=columns)
            else:
                table = pajson.read_json(fh)
                table = table.select(columns) if columns else table
        yield table


def write_json(obj: dict, path: str, storage: StorageConfig | None = None) -> None:
    fs, root = filesystem(path, storage)
    with fs.open(root, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
