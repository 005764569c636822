"""Input rows: parse shards, validate, render and tokenize prompts (pure, no Ray import).

A row is a plain dict. After `parse_jsonl_shard` / `parse_parquet_shard` every row has
    id: str            as given (non-string ids become their JSON text), else "<shard>:<line>"
    prompt: str|None   the input `prompt` when it is a string
    messages: list|None  the input chat `messages`
    max_new_tokens, seed: int|None   per-row overrides
    error: str|None, error_kind: str|None   set when the row cannot be run (ERROR_KINDS)
    carry: bytes       pickle of every other input column, restored unchanged at the end
`tokenize_rows` then adds input_ids, num_input_tokens, num_truncated_tokens and resolves
max_new_tokens / seed. A bad row is never dropped and never raises: it gets `error`.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any, Iterable

ERROR_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_prompt", "bad_prompt",
               "empty_prompt", "bad_messages", "bad_field", "prompt_too_long", "engine_error",
               "bad_shard")
RESERVED = ("id", "prompt", "messages", "max_new_tokens", "seed")


def error_row(row_id: str, kind: str, message: str, carry: dict | None = None) -> dict:
    assert kind in ERROR_KINDS, kind
    return {"id": row_id, "prompt": None, "messages": None, "max_new_tokens": None, "seed": None,
            "error": message, "error_kind": kind, "carry": pickle.dumps(carry or {})}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_record(obj: Any, default_id: str, where: str) -> dict:
    """One parsed input record -> a row (with `error` when it cannot be run)."""
    if not isinstance(obj, dict):
        return error_row(default_id, "not_an_object", f"{where}: expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    row_id = default_id if raw_id is None else raw_id if isinstance(raw_id, str) else json.dumps(raw_id, default=str)
    carry = {k: v for k, v in obj.items() if k not in ("id", "prompt", "max_new_tokens", "seed")}
    prompt, messages = obj.get("prompt"), obj.get("messages")
    row = error_row(row_id, "missing_prompt", "", carry)
    row["error"] = row["error_kind"] = None
    for key in ("max_new_tokens", "seed"):
        value = obj.get(key)
        if value is not None and not (_is_int(value) and value >= (1 if key == "max_new_tokens" else 0)):
            return _fail(row, "bad_field", f"{key} must be an int >= {1 if key == 'max_new_tokens' else 0}, "
                                           f"got {value!r}")
        row[key] = value
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
    assert kind in ERROR_KINDS, kind
    row.update(error=message, error_kind=kind, prompt=None, messages=None)
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


def render(row: dict, tokenizer) -> str:
    """The text to run: `prompt`, or `messages` through the tokenizer's chat template."""
    if row["prompt"] is not None:
        return row["prompt"]
    return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)


def tokenize_rows(rows: Iterable[dict], tokenizer, max_context: int | None, max_new_tokens: int,
                  base_seed: int, over_long: str = "error", max_prompt_tokens: int = 0) -> list[dict]:
    """Add input_ids, num_input_tokens, num_truncated_tokens; resolve max_new_tokens and seed.

    A prompt longer than max_prompt_tokens (0 = context - the row's max_new_tokens) becomes
    a prompt_too_long error row, or with over_long="truncate" keeps its last tokens.
    """
    assert over_long in ("error", "truncate"), over_long
    out = []
    for row in rows:
        row = dict(row, input_ids=[], num_input_tokens=0, num_truncated_tokens=0)
        row["max_new_tokens"] = row["max_new_tokens"] or max_new_tokens
        row["seed"] = row["seed"] if row["seed"] is not None else derived_seed(base_seed, row["id"])
        if row["error"] is None:
            try:
                ids = list(tokenizer(render(row, tokenizer))["input_ids"])
            except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the roles
                out.append(_fail(row, "bad_messages" if row["messages"] else "bad_prompt", f"cannot render: {e}"))
                continue
            limit = max_prompt_tokens or (max_context - row["max_new_tokens"] if max_context else 0)
            if not ids:
                _fail(row, "empty_prompt", "empty prompt (no tokens)")
            elif limit and len(ids) > limit:
                if over_long == "truncate" and limit > 0:
                    row["num_truncated_tokens"] = len(ids) - limit
                    ids = ids[-limit:]
                else:
                    _fail(row, "prompt_too_long", f"{len(ids)} prompt tokens exceed the limit of "
                                                  f"{max(limit, 0)} (context {max_context}, "
                                                  f"max_new_tokens {row['max_new_tokens']})")
            if row["error"] is None:
                row.update(input_ids=ids, num_input_tokens=len(ids))
        out.append(row)
    return out


OUTPUT_FIELDS = ("id", "generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens",
                 "prefill_s", "ttft_s", "decode_s", "pack_rows", "pack_efficiency", "error", "error_kind")


def output_row(row: dict, result=None, error: tuple[str, str] | None = None) -> dict:
    """The written row: carried input columns, `prompt`, then the generation fields.

    `result` is a GenerationResult (None for an error row). Output fields win over an input
    column of the same name.
    """
    out = pickle.loads(row["carry"]) if row.get("carry") else {}
    out["prompt"] = row.get("prompt")
    kind, message = error if error else (row.get("error_kind"), row.get("error"))
    r = result if kind is None else None
    out.update(
        id=row["id"], generated_text=r.text if r else None, finish_reason=r.finish_reason if r else None,
        num_input_tokens=row.get("num_input_tokens", 0),
        num_truncated_tokens=row.get("num_truncated_tokens", 0),
        num_generated_tokens=r.num_generated_tokens if r else 0,
        prefill_s=r.prefill_s if r else None, ttft_s=r.ttft_s if r else None,
        decode_s=r.decode_s if r else None, pack_rows=r.pack_rows if r else None,
        pack_efficiency=r.pack_efficiency if r else None, error=message, error_kind=kind)
    return out
