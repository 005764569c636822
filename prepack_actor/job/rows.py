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
    carry: dict        every other input column, restored unchanged at the end (carry.py types it)
The task's prepare stage then adds num_input_tokens and `payload` (its prepared input:
token ids, or an encoded scoring item), and `make_groups` cuts rows into groups that
travel as one record each. In Arrow (`rows_to_table`) messages, sampling_params, carry and
payload are pickled. A bad row is never dropped and never raises: it gets `error` (docs/failure.md,
"Every row is data": invalid Unicode, nesting, anything else).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from typing import Any, Iterator, Sequence

import pyarrow as pa

from ..core.grouping import group_by_length

ERROR_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_prompt", "bad_prompt",
               "empty_prompt", "bad_messages", "bad_field", "prompt_too_long", "bad_shard",  # any task
               "bad_item", "bad_choices", "bad_answer", "too_long",  # scoring items
               "invalid_unicode", "duplicate_id",  # any task, found while reading
               "engine_error", "out_of_memory",  # the model failed on this row
               "internal_error")  # the job's own code failed on this row or its group
RETRYABLE_KINDS = ("out_of_memory", "engine_error", "internal_error")  # resume runs these rows again
RESERVED = ("id", "prompt", "messages", "sampling_params", "max_new_tokens", "seed")
TOP_LEVEL_SAMPLING = ("max_new_tokens", "seed")  # sampling keys a row may also give outside sampling_params
MAX_DEPTH = 100  # nesting levels a row may have (lists, objects); deeper rows are bad_field rows
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # how one looks in JSON text


def error_row(row_id: str, kind: str, message: str, carry: dict | None = None) -> dict:
    assert kind in ERROR_KINDS, kind
    return {"id": row_id, "prompt": None, "messages": None, "sampling_params": None, "max_new_tokens": None,
            "seed": None, "error": message, "error_kind": kind, "carry": dict(carry or {})}


def short(value: Any, n: int = 60) -> str:
    """A value for a message: repr, cut to about n characters (ids may be 10k long)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def check_value(obj: Any, unicode: bool = True) -> str | None:
    """What makes a parsed record unusable, or None: a lone UTF-16 surrogate in any string or
    key (valid JSON, not valid Unicode: Arrow and UTF-8 refuse it), or nesting deeper than
    MAX_DEPTH. Iterative, so no input can exhaust the stack."""
    stack = [(obj, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"{path or 'the row'} is nested deeper than {MAX_DEPTH} levels"
        if isinstance(v, str):
            m = _SURROGATE.search(v) if unicode else None
            if m:
                return (f"{path or 'the row'}: lone UTF-16 surrogate \\u{ord(m.group()):04x} at character "
                        f"{m.start()} (valid JSON, not valid Unicode)")
        elif isinstance(v, dict):
            for k, x in v.items():
                name = f"{path}.{k}" if path else str(k)
                if unicode and isinstance(k, str) and _SURROGATE.search(k):
                    return f"key {short(k.encode('utf-8', 'backslashreplace').decode())}: lone UTF-16 surrogate"
                stack.append((x, name, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
    return None


def validate_record(obj: Any, default_id: str, where: str, unicode: bool = True) -> dict:
    """One parsed input record -> a row (with `error` when it cannot be run); never raises.

    unicode=False skips the surrogate search (a JSON line without a \\uD8xx escape)."""
    try:
        return _validate(obj, default_id, where, unicode)
    except Exception as e:  # noqa: BLE001 - the exception boundary is the row
        return error_row(default_id, "internal_error", f"{where}: {type(e).__name__}: {e}")


def _validate(obj: Any, default_id: str, where: str, unicode: bool) -> dict:
    if not isinstance(obj, dict):
        return error_row(default_id, "not_an_object", f"{where}: expected a JSON object, got {type(obj).__name__}")
    problem = check_value(obj, unicode)
    if problem is not None:
        raw = obj.get("id")
        ok_id = isinstance(raw, str) and check_value(raw, unicode) is None
        kind = "bad_field" if "nested deeper" in problem else "invalid_unicode"
        return error_row(raw if ok_id else default_id, kind, f"{where}: {problem}")
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
        return _fail(row, "bad_field", f"sampling_params: expected an object of sampling keys, got {short(overrides)}")
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


def iter_jsonl_shard(data: bytes, shard: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSONL shard; bad lines are error rows."""
    for lineno, line in enumerate(io.BytesIO(data), start=1):
        if not line.strip():
            continue
        default_id, where = f"{shard}:{lineno}", f"{shard} line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, error_row(default_id, "invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield lineno, error_row(default_id, "invalid_json", f"{where}: invalid JSON: {e.msg} (col {e.colno})")
            continue
        except (RecursionError, ValueError) as e:  # nested past Python's limit, a number too long to convert
            yield lineno, error_row(default_id, "invalid_json", f"{where}: cannot parse: {type(e).__name__}: "
                                                                f"{str(e)[:200]}")
            continue
        yield lineno, validate_record(obj, default_id, where, unicode=bool(_ESCAPED_SURROGATE.search(line)))


def iter_parquet_shard(data: bytes, shard: str) -> Iterator[tuple[int, dict]]:
    """(record index, row) for every record of a Parquet shard; an unreadable shard is one
    error row; a record that cannot be converted (e.g. invalid UTF-8 in a string column) is
    an error row of its own."""
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a corrupt shard must not kill the job
        yield 0, error_row(f"{shard}:0", "bad_shard", f"{shard}: unreadable Parquet: {e}")
        return
    for start in range(0, table.num_rows, 1024):
        batch = table.slice(start, 1024)
        try:
            records = batch.to_pylist()
        except Exception:  # noqa: BLE001 - find the records that fail, one by one
            records = [_record(batch, i) for i in range(batch.num_rows)]
        for i, obj in enumerate(records, start=start):
            if isinstance(obj, Exception):
                yield i, error_row(f"{shard}:{i}", "invalid_utf8", f"{shard} row {i}: cannot read: {obj}")
            else:
                yield i, validate_record(obj, f"{shard}:{i}", f"{shard} row {i}", unicode=False)


def _record(batch, i: int):
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except Exception as e:  # noqa: BLE001
        return e


def parse_jsonl_shard(data: bytes, shard: str) -> list[dict]:
    """Every line of a JSONL shard -> one row; blank lines are skipped, bad lines are error rows."""
    return [row for _, row in iter_jsonl_shard(data, shard)]


def parse_parquet_shard(data: bytes, shard: str) -> list[dict]:
    """Every record of a Parquet shard -> one row; an unreadable shard is one error row."""
    return [row for _, row in iter_parquet_shard(data, shard)]


DUPLICATE_POLICIES = ("error", "suffix")  # input.duplicate_ids


def mark_repeat(row: dict, k: int, first: str, policy: str) -> dict:
    """A row whose id an earlier row has (scan.py): its id becomes `<id>#<k>` (unique in the
    job), and with policy "error" it is a `duplicate_id` row (prompt kept, not run); with
    "suffix" it runs under the new id. A row that is already an error keeps its error."""
    assert policy in DUPLICATE_POLICIES, policy
    old = row["id"]
    row["id"] = new = f"{old}#{k}"
    note = f"duplicate id {short(old)} (first at {first}), written as {short(new)}"
    if row["error"] is not None:
        row["error"] += f"; {note}"
    elif policy == "error":
        row.update(error=f"{note}; not run (input.duplicate_ids=suffix runs it)", error_kind="duplicate_id")
    return row


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
PICKLED = ("messages", "sampling_params", "carry", "payload")  # Python objects stored as pickles between stages
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
    return dict(row.get("carry") or {})
