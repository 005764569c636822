"""The generation job end to end on a private local Ray: mixed shards, bad rows, oracle."""
import json

import pyarrow as pa
import pytest

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.actor import PrepackActor
from prepack_actor.job.config import ModelConfig, PackingConfig, ProcessorConfig, PromptsConfig, SamplingConfig
from prepack_actor.job.generate import GenerateTask
from prepack_actor.job.rows import parse_jsonl_shard
from prepack_actor.job.storage import read_output
from prepack_actor.models import load_tokenizer

from job_helpers import BAD_LINES, MESSAGES, good_jsonl_lines, load_job, write_inputs

MAX_NEW = 6


def expected_by_prompt(model_dir, texts, max_new):
    """The oracle: Engine.generate on each prompt alone."""
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    return {t: engine.generate([t], SamplingParams(max_new_tokens=n))[0] for t, n in zip(texts, max_new)}


def test_actor_called_directly_matches_engine(tiny_model_dir):
    """The stage worker without Ray: a group in, one output row per row, greedy == alone."""
    path = tiny_model_dir("llama")
    tok, ctx = load_tokenizer(path)
    task = GenerateTask(SamplingConfig(max_new_tokens=MAX_NEW, seed=0), PromptsConfig())
    rows = [task.prepare_row(r, tok, ctx) for r in
            parse_jsonl_shard("\n".join(good_jsonl_lines()).encode() + b"\n{bad", "s.jsonl")]
    actor = PrepackActor(ProcessorConfig(task="generate", model=ModelConfig(path=path, cache_dir="unused", device="cpu"),
                                         packing=PackingConfig(max_group_tokens=4096, max_group_prompts=64),
                                         sampling=SamplingConfig(max_new_tokens=MAX_NEW)))
    out = actor.run_group(rows)
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    texts = [r["prompt"] or tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
             for r in rows if r["error"] is None]
    ref = expected_by_prompt(path, texts, [MAX_NEW, MAX_NEW, MAX_NEW, 3])
    by_id = {r["id"]: r for r in out}
    for r, t in zip([r for r in rows if r["error"] is None], texts):
        assert by_id[r["id"]]["generated_text"] == ref[t].text
    assert by_id["s.jsonl:5"]["error_kind"] == "invalid_json"
    assert isinstance(PrepackActor.__call__(actor, pa.table({"rows": []}, schema=pa.schema([("rows", pa.binary())]))),
                      pa.Table)


@pytest.mark.slow
@pytest.mark.parametrize("out_format", ["parquet", "jsonl"])
def test_job_mixed_shards_bad_rows_and_oracle(out_format, tiny_model_dir, ray_local, tmp_path):
    model_dir = tiny_model_dir("llama")
    inputs = write_inputs(tmp_path)
    out_dir = tmp_path / "out"
    job = load_job("generate")
    summary = job.main([f"model.path={model_dir}", f"input.path={inputs['dir']}", f"output.path={out_dir}",
                        f"output.format={out_format}", f"sampling.max_new_tokens={MAX_NEW}",
                        "packing.max_group_tokens=64", "packing.max_group_prompts=3", "actors.concurrency=1"])
    table = pa.concat_tables(list(read_output(str(out_dir), out_format)), promote_options="permissive")
    rows = {r["id"]: r for r in table.to_pylist()}

    # Rows in = rows out; every bad row has the right error; nothing else errs.
    assert table.num_rows == len(rows) == inputs["num_rows"] == summary["rows_in"] == summary["rows_out"]
    for row_id, kind in inputs["bad"].items():
        assert rows[row_id]["error_kind"] == kind, (row_id, rows[row_id])
        assert rows[row_id]["generated_text"] is None and rows[row_id]["error"]
    assert "b.jsonl line 2" in rows["b.jsonl:2"]["error"]
    good = {k: v for k, v in rows.items() if k not in inputs["bad"]}
    assert len(good) == 6 and all(r["error"] is None for r in good.values())
    assert summary["errors_by_kind"] == {k: 1 for k in inputs["bad"].values()}
    assert summary["allocators"] == ["tcmalloc"]  # actors.allocator: auto, with tcmalloc installed (scripts/setup.sh)

    # Ids as given or derived; carried columns unchanged (nested ones too).
    assert set(good) == {"p0", "a.jsonl:2", "chat0", "p3", "pq0", "pq1"}
    assert rows["p0"]["topic"] == "sea" and rows["p0"]["meta"] == {"n": 1} and rows["pq1"]["meta"] == {"n": 6}
    # Greedy outputs equal the engine run on each prompt alone (chat via the template, whose
    # text is the chat row's `prompt`); error rows keep their input prompt.
    tok, _ = load_tokenizer(model_dir)
    chat_text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rows["chat0"]["messages"] == MESSAGES and rows["chat0"]["prompt"] == chat_text
    assert rows["int-prompt"]["prompt"] == "42" and rows["bad-msgs"]["messages"][0]["role"] == "user"
    texts = {k: (r["prompt"] or chat_text) for k, r in good.items()}
    limits = {k: 3 if k == "p3" else MAX_NEW for k in good}
    ref = expected_by_prompt(model_dir, list(texts.values()), list(limits.values()))
    for k, r in good.items():
        exp = ref[texts[k]]
        assert r["generated_text"] == exp.text and r["finish_reason"] == exp.finish_reason, k
        assert r["generated_tokens"] == exp.token_ids and r["stop_reason"] is None and r["logprobs"] is None, k
        assert r["num_input_tokens"] == exp.num_input_tokens and r["num_generated_tokens"] == exp.num_generated_tokens
        assert 0 < r["pack_efficiency"] <= 1 and r["pack_rows"] >= 1 and r["ttft_s"] > 0 and r["prefill_s"] > 0
    assert rows["p3"]["num_generated_tokens"] <= 3

    # _summary.json beside the outputs.
    on_disk = json.loads((out_dir / "_summary.json").read_text())
    assert on_disk["rows_out"] == inputs["num_rows"] and on_disk["config"]["sampling"]["max_new_tokens"] == MAX_NEW
    assert on_disk["tokens_out"] == sum(r["num_generated_tokens"] for r in good.values())
    assert on_disk["tokens_in"] == sum(r["num_input_tokens"] for r in good.values())
    assert on_disk["model"] == model_dir and on_disk["tokens_out_per_s"] > 0
    assert 0 < on_disk["mean_pack_efficiency"] <= 1
    assert on_disk["engine_path"] == "packed" and on_disk["capability"] == {"route": "packed", "model_type": "llama"}
    assert all(r["engine_path"] == "packed" for r in good.values())


def test_actor_pool_that_takes_every_cpu_is_refused(ray_local):
    """Two 1-CPU actors on a 2-CPU Ray would starve the read tasks and hang: refuse it."""
    from prepack_actor.job.read import JobError, check_actor_fit

    with pytest.raises(JobError, match=r"actors.concurrency=2 x actors.cpus_per_actor=1 reserve all 2 CPUs"):
        check_actor_fit(2, 1, 0)
    check_actor_fit(2, 0.5, 0)  # leaves one CPU free: accepted


@pytest.mark.slow
def test_limit_runs_only_the_first_rows(tiny_model_dir, ray_local, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": f"{i} " + "word " * (i % 5 + 1)})
                             for i in range(20)) + "\n")
    summary = load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                         f"output.path={tmp_path / 'out'}", "input.limit=7",
                                         "sampling.max_new_tokens=2", "actors.concurrency=1",
                                         "actors.allocator=system"])
    table = pa.concat_tables(list(read_output(str(tmp_path / "out"), "parquet")))
    assert sorted(table.column("id").to_pylist()) == sorted(f"r{i}" for i in range(7))
    assert summary["rows_in"] == summary["rows_out"] == 7
    assert summary["allocators"] == ["system"]  # no LD_PRELOAD for the actors
