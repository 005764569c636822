"""Rows between stages: parse records, error rows, Arrow schemas, groups (no Ray import).

A row is a plain dict. After `parse_record` (a user's Dataset row) or `parse_jsonl_shard` /
`parse_parquet_shard` (the jobs' shards) every row has
    id: str            as given (non-string ids become their JSON text), else "<shard>:<line>"
    prompt: str|None   the input `prompt` (a non-string one as its JSON text, on an error row)
    messages: list|None  the input chat `messages`
    sampling_params: dict|None  the row's own sampling settings (ray.data.llm's column; the
                       top-level `max_new_tokens` and `seed` are folded in), checked by the task
    max_new_tokens, seed: int|None   resolved by the generation task's prepare
    error: str|None, error_kind: str|None   set when the row cannot be run (ERROR_KINDS)
    carry: bytes       pickle of every other input column, restored unchanged at the end
The task's prepare stage then adds num_input_tokens and `payload` (its pickled prepared
input: token ids, or an encoded scoring item), and `make_groups` cuts rows into groups that
travel as one record each. A bad row is never dropped and never raises: it gets `error`.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any, Sequence

import pyarrow as pa

from ..core.grouping import group_by_length

ERROR_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_prompt", "bad_prompt",
               "empty_prompt", "bad_messages", "bad_field", "prompt_too_long", "bad_shard",  # any task
               "bad_item", "bad_choices", "bad_answer", "too_long",  # scoring items
               "engine_error", "out_of_memory")  # the model failed on this row
RESERVED = ("id", "prompt", "messages", "sampling_params", "max_new_tokens", "seed")
TOP_LEVEL_SAMPLING = ("max_new_tokens", "seed")  # sampling keys a row may also give outside sampling_params


def error_row(row_id: str, kind: str, message: str, carry: dict | None = None) -> dict:
    assert kind in ERROR_KINDS, kind
    return {"id": row_id, "prompt": None, "messages": None, "sampling_params": None, "max_new_tokens": None,
            "seed": None, "error": message, "error_kind": kind, "carry": pickle.dumps(carry or {})}


def validate_record(obj: Any, default_id: str, where: str) -> dict:
    """One parsed input record -> a row (with `error` when it cannot be run)."""
    if not isinstance(obj, dict):
        return error_row(default_id, "not_an_object", f"{where}: expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    row_id = default_id if raw_id is None else raw_id if isinstance(raw_id, str) else json.dumps(raw_id, default=str)
    carry = {k: v for k, v in obj.items() if k not in ("id", "prompt", "sampling_params") + TOP_LEVEL_SAMPLING}
    prompt, messages = obj.get("prompt"), obj.get("messages")
    row = error_row(row_id, "missing_prompt", "", carry)
    row["error"] = row["error_kind"] = None
    # An error row keeps its input prompt: as given, or as JSON text when it is not a string.
    row["prompt"] = prompt if prompt is None or isinstance(prompt, str) else json.dumps(prompt, default=str)
    overrides = obj.get("sampling_params")
    if overrides is not None and not (isinstance(overrides, dict) and all(isinstance(k, str) for k in overrides)):
        return _fail(row, "bad_field", f"sampling_params: expected an object of sampling keys, got {overrides!r}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # null = not set (Parquet structs)
    for key in TOP_LEVEL_SAMPLING:
        if obj.get(key) is not None:
            if key in overrides:
                return _fail(row, "bad_field", f"{key}: given both at top level and in sampling_params")
            overrides[key] = obj[key]
    row["sampling_params"] = overrides or None
    if prompt is None and messages is None:
        return _fail(row, "missing_prompt", "missing 'prompt' (string) or 'messages' (chat list)")
    if prompt is not None:
        if not isinstance(prompt, str):
            return _fail(row, "bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            return _fail(row, "empty_prompt", "empty prompt")
        row["prompt"] = prompt
        return row
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        return _fail(row, "bad_messages", "'messages' must be a non-empty list of {role, content} strings")
    row["messages"] = messages
    return row


def _fail(row: dict, kind: str, message: str) -> dict:
    """The row as an error row; its prompt stays (messages are carried as input columns)."""
    assert kind in ERROR_KINDS, kind
    row.update(error=message, error_kind=kind, messages=None)
    return row


def parse_jsonl_shard(data: bytes, shard: str) -> list[dict]:
    """Every line of a JSONL shard -> one row; blank lines are skipped, bad lines are error rows."""
    rows = []
    for lineno, line in enumerate(io.BytesIO(data), start=1):
        if not line.strip():
            continue
        default_id, where = f"{shard}:{lineno}", f"{shard} line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(error_row(default_id, "invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(error_row(default_id, "invalid_json", f"{where}: invalid JSON: {e.msg} (col {e.colno})"))
            continue
        rows.append(validate_record(obj, default_id, where))
    return rows


def parse_parquet_shard(data: bytes, shard: str) -> list[dict]:
    """Every record of a Parquet shard -> one row; an unreadable shard is one error row."""
    import pyarrow.parquet as pq
    try:
        records = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as e:  # noqa: BLE001 - a corrupt shard must not kill the job
        return [error_row(f"{shard}:0", "bad_shard", f"{shard}: unreadable Parquet: {e}")]
    return [validate_record(obj, f"{shard}:{i}", f"{shard} row {i}") for i, obj in enumerate(records)]


def derived_seed(base: int, row_id: str) -> int:
    """A row's seed from the job seed and its id: the same on every run and every actor."""
    digest = hashlib.blake2b(f"{base}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def parse_record(obj: Any) -> dict:
    """A row of a user's Dataset -> a row; without an `id` it gets one from its content."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return validate_record(obj, "row-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), "row")


ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("messages", pa.binary()),  # pickled list | null
    ("sampling_params", pa.binary()),  # pickled dict | null
    ("max_new_tokens", pa.int64()), ("seed", pa.int64()), ("error", pa.string()),
    ("error_kind", pa.string()), ("carry", pa.binary())])  # pickled dict of carried columns
PREPARED_SCHEMA = pa.schema(list(ROW_SCHEMA) + [
    ("num_input_tokens", pa.int64()), ("payload", pa.binary())])  # pickled task input | null
PICKLED = ("messages", "sampling_params", "payload")  # Python objects stored as pickles between stages
GROUP_SCHEMA = pa.schema([("rows", pa.binary()), ("num_rows", pa.int64()), ("num_tokens", pa.int64())])


def rows_to_table(rows: list[dict], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    cols = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if f.name in PICKLED:
            values = [pickle.dumps(v) if v is not None else None for v in values]
        cols[f.name] = pa.array(values, type=f.type)
    return pa.table(cols, schema=schema)


def table_to_rows(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    for r in rows:
        for k in PICKLED:
            if r.get(k) is not None:
                r[k] = pickle.loads(r[k])
    return rows


def make_groups(rows: Sequence[dict], max_group_tokens: int, max_group_prompts: int,
                sort: bool = True) -> dict[str, list]:
    """One window of rows -> columns with one record per group: rows (pickled), num_rows, num_tokens.

    Groups come from core.grouping.group_by_length over num_input_tokens. Error rows go in
    a group of their own, so actor calls that hit the model hold only runnable rows.
    """
    good = [r for r in rows if r.get("error") is None]
    bad = [r for r in rows if r.get("error") is not None]
    groups = [[good[i] for i in g] for g in group_by_length(
        [r["num_input_tokens"] for r in good], max_group_tokens, max_group_prompts, sort)]
    groups += [bad] if bad else []
    return {"rows": [pickle.dumps(g) for g in groups],
            "num_rows": [len(g) for g in groups],
            "num_tokens": [sum(r["num_input_tokens"] for r in g) for g in groups]}


def unpack_group(blob: bytes) -> list[dict]:
    return pickle.loads(blob)


def carried(row: dict) -> dict:
    """The row's carried input columns (every input column the task does not consume)."""
    return pickle.loads(row["carry"]) if row.get("carry") else {}
