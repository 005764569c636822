import json

import pytest

from prepack_actor.job.config import PromptsConfig, SamplingConfig
from prepack_actor.job.generate import GenerateTask
from prepack_actor.job.rows import derived_seed, parse_jsonl_shard, parse_parquet_shard, validate_record


def tokenize_rows(rows, tok, max_context, max_new_tokens, base_seed, over_long="error"):
    task = GenerateTask(SamplingConfig(max_new_tokens=max_new_tokens, seed=base_seed), PromptsConfig(over_long))
    return [task.prepare_row(r, tok, max_context) for r in rows]


def output_row(row):
    return GenerateTask(SamplingConfig(), PromptsConfig()).output_row(row)


class FakeTok:
    """Whitespace tokenizer with a ChatML-like template: enough to test row logic."""

    def __call__(self, text):
        return {"input_ids": list(range(1, len(text.split()) + 1))}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"


def test_every_line_becomes_a_row_with_its_error():
    data = b"\n".join([
        b'{"id": "a", "prompt": "hi there", "x": 1}', b"", b"{oops", b'{"prompt": 3}',
        b'{"prompt": "  "}', b'"just a string"', b'{"id": 7, "messages": [{"role": "user", "content": "q"}]}',
        b'{"prompt": "\xff"}', b'{"prompt": "ok", "max_new_tokens": 0}', b'{"topic": "none"}'])
    # Sampling values are checked by the task's prepare (SamplingParams), the rest at parse.
    rows = tokenize_rows(parse_jsonl_shard(data, "s.jsonl"), FakeTok(), 100, 4, 0)
    kinds = [r["error_kind"] for r in rows]
    assert kinds == [None, "invalid_json", "bad_prompt", "empty_prompt", "not_an_object", None,
                     "invalid_utf8", "bad_field", "missing_prompt"]
    assert rows[0]["id"] == "a" and rows[0]["carry"] == {"x": 1}
    assert rows[1]["id"] == "s.jsonl:3" and "s.jsonl line 3" in rows[1]["error"]
    assert rows[5]["id"] == "7" and rows[5]["messages"][0]["content"] == "q"  # non-string id -> JSON text
    assert rows[6]["id"] == "s.jsonl:8" and "UTF-8" in rows[6]["error"]
    assert rows[2]["id"] == "s.jsonl:4"  # blank line 2 is skipped but still counted
    assert rows[7]["error"] == "sampling_params.max_new_tokens: expected an int >= 1, got 0"
    assert rows[7]["prompt"] == "ok" and rows[2]["prompt"] == "3"  # error rows keep their prompt


def test_parquet_shard_and_corrupt_shard():
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a b", None], "k": [1, 2]}), buf)
    rows = parse_parquet_shard(buf.getvalue(), "p.parquet")
    assert [r["id"] for r in rows] == ["p.parquet:0", "p.parquet:1"]
    assert [r["error_kind"] for r in rows] == [None, "missing_prompt"]
    assert parse_parquet_shard(b"garbage", "x.parquet")[0]["error_kind"] == "bad_shard"


def test_tokenize_limits_truncation_and_seeds():
    rows = [validate_record({"id": "a", "prompt": "w " * 10}, "d", "w"),
            validate_record({"id": "b", "prompt": "w " * 3, "max_new_tokens": 2, "seed": 5}, "d", "w"),
            validate_record({"id": "c", "messages": [{"role": "user", "content": "hi"}]}, "d", "w")]
    out = tokenize_rows(rows, FakeTok(), max_context=12, max_new_tokens=4, base_seed=1)
    assert out[0]["error_kind"] == "prompt_too_long" and "10 prompt tokens" in out[0]["error"]
    assert out[1]["num_input_tokens"] == 3 and out[1]["max_new_tokens"] == 2 and out[1]["seed"] == 5
    assert out[2]["num_input_tokens"] == 3  # "<user> hi <assistant>"
    assert out[0]["seed"] == derived_seed(1, "a") != derived_seed(2, "a")
    cut = tokenize_rows(rows[:1], FakeTok(), 12, 4, 1, over_long="truncate")[0]
    assert cut["error"] is None and cut["payload"]["input_ids"] == list(range(3, 11))
    assert cut["payload"]["num_truncated_tokens"] == 2


def test_output_row_carries_columns_and_output_wins():
    row = validate_record({"id": "a", "prompt": "p", "topic": "t", "error": "input col"}, "d", "w")
    out = output_row(dict(row, num_input_tokens=1))
    assert out["topic"] == "t" and out["error"] is None and out["generated_text"] is None
    json.dumps(out)
