"""The generation job on a shard of poison rows, on a private local Ray (loopback only):
it succeeds, rows in = rows out, every good row equals the engine on its prompt alone,
every poison row is carried or flagged as docs/failure.md says; then resume."""
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.storage import read_output
from prepack_actor.models import load_tokenizer

from job_helpers import BIG_DOC, LONG_PROMPT, MESSAGES, env, load_job, poison_shards

pytestmark = pytest.mark.slow

NUM_ROWS = 35
COMMON = ["sampling.max_new_tokens=2", "actors.concurrency=1", "packing.max_group_prompts=8",
          "output.rows_per_file=10"]


def run_job(*args):
    return load_job("generate").main(list(args))


def read_rows(out, fmt="parquet") -> dict:
    table = pa.concat_tables(list(read_output(str(out), fmt)), promote_options="permissive")
    rows = table.to_pylist()
    assert len(rows) == len({r["id"] for r in rows}), "an id was written twice"
    return {r["id"]: r for r in rows}


def assert_generated_alone(model_dir, rows: dict) -> None:
    """Every row without an error: greedy text equal to the engine on its prompt alone."""
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    chat = load_tokenizer(model_dir)[0].apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    good = [r for r in rows.values() if r["error"] is None]
    texts = [r["prompt"] if r["prompt"] is not None else chat for r in good]
    for r, ref in zip(good, engine.generate(texts, SamplingParams(max_new_tokens=2))):
        assert r["generated_text"] == ref.text and r["num_generated_tokens"] == ref.num_generated_tokens, r["id"][:40]


def test_poison_shard_job_succeeds_and_a_killed_parse_task_counts_once(tiny_model_dir, ray_local, tmp_path):
    """Both poison shards (job_helpers.poison_shards); the first task that parses a shard is
    killed (os._exit) and retried by Ray: rows_in is still exact (counted by the scan)."""
    model = tiny_model_dir("llama")
    shards, out, marker = poison_shards(tmp_path), tmp_path / "out", tmp_path / "crash"
    with env(PREPACK_FAULT_EXIT_IN_PARSE=1, PREPACK_FAULT_MARKER=marker):
        summary = run_job(f"model.path={model}", f"input.path={shards['dir']}", f"output.path={out}", *COMMON)
    assert Path(f"{marker}.parse").exists(), "the injected parse crash did not happen"
    assert summary["rows_in"] == summary["rows_out"] == NUM_ROWS and summary["duplicate_ids"] == 5
    rows = read_rows(out)
    assert {i: r["error_kind"] for i, r in rows.items()} == shards["expected"]
    assert all(r["error"] for r in rows.values() if r["error_kind"])
    assert_generated_alone(model, rows)
    assert rows["g2"]["prompt"] == "smile \U0001F600 please" and rows["long"]["prompt"] == LONG_PROMPT
    assert rows["dup#2"]["prompt"] is not None and "first at a.jsonl line 19" in rows["dup#2"]["error"]

    # Carried values: typed when all rows agree, JSON text otherwise; one schema in every file.
    assert [json.loads(rows[i]["meta"]) for i in ("g0", "g1", "g9")] == [1, "one", 5]
    assert json.loads(rows["g1"]["big"]) == 2 ** 70 and json.loads(rows["g9"]["empty"]) == {"z": 1}
    assert rows["g0"]["nested"] == {"k": {"j": [1, 2]}} and rows["g0"]["tags"] == ["a"]
    assert json.loads(rows["chat"]["messages"]) == MESSAGES and json.loads(rows["msg-str"]["messages"]) == "hello"
    assert rows["big-doc"]["doc"] == BIG_DOC
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 4 and len({str(pq.read_schema(f)) for f in files}) == 1
    frame = pd.read_parquet(out)
    assert len(frame) == NUM_ROWS and frame["id"].is_unique  # ids of every shape, read back
    assert {"../../x", "a/b", "L" * 10000, "", "1", "1#1", "2.5", '{"k": 1}'} <= set(frame["id"])
    assert json.loads((out / "_summary.json").read_text())["errors_by_kind"] == {
        "bad_field": 6, "bad_messages": 1, "duplicate_id": 5, "invalid_json": 2, "invalid_unicode": 2}


def test_resume_retries_an_oom_row_reads_a_1mb_jsonl_row_and_keeps_repeat_ids(tiny_model_dir, ray_local,
                                                                              tmp_path):
    """input.duplicate_ids=suffix, JSONL output. Run 1: the first 33 rows, and every (sub)group
    over 60 prompt tokens runs out of memory, so the 91-token row is an out_of_memory row.
    Run 2 (resume, no fault): the out_of_memory row runs again, the 1 MB row's file is read
    back, the repeats get the same <id>#<k> as before: each id once, no input error retried."""
    model = tiny_model_dir("llama")
    shards, out = poison_shards(tmp_path), tmp_path / "out"
    args = [f"model.path={model}", f"input.path={shards['dir']}", f"output.path={out}", "output.format=jsonl",
            "input.duplicate_ids=suffix", *COMMON]
    with env(PREPACK_FAULT_OOM_ABOVE_TOKENS=60):
        first = run_job(*args, "input.limit=33")
    rows = read_rows(out, "jsonl")
    assert first["rows_out"] == 33 and rows["long"]["error_kind"] == "out_of_memory"
    assert rows["dup#1"]["error"] is None and rows["x#2"]["generated_text"] is not None  # suffix: repeats run
    assert any(len(line) > 1 << 20 for f in out.glob("part-*.jsonl") for line in f.read_bytes().splitlines())

    second = run_job(*args)
    assert (second["rows_in"], second["rows_out"], second["rows_retried"]) == (NUM_ROWS, NUM_ROWS, 1)
    assert (second["rows_reused"], second["rows_new"]) == (32, 3)
    rows = read_rows(out, "jsonl")
    expected = {i: (None if k == "duplicate_id" else k) for i, k in shards["expected"].items()}
    assert {i: r["error_kind"] for i, r in rows.items()} == expected
    assert rows["long"]["num_input_tokens"] == 91 and rows["big-doc"]["doc"] == BIG_DOC
    assert_generated_alone(model, rows)
