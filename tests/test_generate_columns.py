"""The generation task's sampling columns: per-row overrides, typed output columns, error rows
that keep their input. The actor runs without Ray (fast); one slow test runs the job."""
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.actor import PrepackActor
from prepack_actor.job.config import ModelConfig, PackingConfig, ProcessorConfig, PromptsConfig, SamplingConfig
from prepack_actor.job.generate import GenerateTask
from prepack_actor.job.rows import derived_seed, validate_record
from prepack_actor.models import load_tokenizer

from job_helpers import MESSAGES, PROMPTS, load_job

BASE = SamplingConfig(max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("llama")
    model, tok = load_model(path, dtype="float32", device="cpu")
    actor = PrepackActor(ProcessorConfig(task="generate", model=ModelConfig(path=path, cache_dir="unused", device="cpu"),
                                         packing=PackingConfig(max_group_tokens=4096, max_group_prompts=64),
                                         sampling=BASE))
    return path, Engine(model, tok), actor


def run_rows(setup, records):
    """records -> output rows by id (parse, prepare, one actor call), and the Arrow table."""
    path, _, actor = setup
    tok, ctx = load_tokenizer(path)
    rows = [actor.task.prepare_row(validate_record(r, f"d:{i}", f"line {i}"), tok, ctx) for i, r in enumerate(records)]
    out = actor.run_group(rows)
    return {r["id"]: r for r in out}, actor.task.to_table(out)


def test_per_row_sampling_params_equal_the_engine_and_bad_ones_are_error_rows(setup):
    _, engine, _ = setup
    tok = engine.tokenizer
    stop_id = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4, repetition_penalty=1.4))[0].token_ids[1]
    good = {
        "plain": ({"prompt": PROMPTS[0]}, {}),
        "sampled": ({"prompt": PROMPTS[1], "sampling_params": {"temperature": 0.9, "seed": 4, "n": 2, "logprobs": 2,
                                                               "top_k": 20, "min_p": None}},
                    dict(temperature=0.9, seed=4, n=2, logprobs=2, top_k=20)),
        "stopped": ({"prompt": PROMPTS[2], "max_new_tokens": 4,
                     "sampling_params": {"repetition_penalty": 1.4, "stop_token_ids": [stop_id]}},
                    dict(max_new_tokens=4, repetition_penalty=1.4, stop_token_ids=[stop_id])),
        "chat": ({"messages": MESSAGES, "sampling_params": {"min_tokens": 2, "frequency_penalty": 0.5}},
                 dict(min_tokens=2, frequency_penalty=0.5)),
    }
    bad = {
        "bad-value": ({"prompt": PROMPTS[0], "sampling_params": {"temperature": -1}},
                      "bad_field", "sampling_params.temperature: expected a number >= 0, got -1"),
        "vllm-name": ({"prompt": PROMPTS[0], "sampling_params": {"max_tokens": 5}},
                      "bad_field", "sampling_params.max_tokens: unknown sampling key (vLLM's max_tokens is max_new_tokens"),
        "not-a-dict": ({"prompt": PROMPTS[0], "sampling_params": [1]}, "bad_field", "sampling_params: expected an object"),
        "twice": ({"prompt": PROMPTS[0], "max_new_tokens": 3, "sampling_params": {"max_new_tokens": 4}},
                  "bad_field", "max_new_tokens: given both at top level and in sampling_params"),
        "chat-bad-seed": ({"messages": MESSAGES, "seed": -1}, "bad_field", "sampling_params.seed: expected null"),
        "too-long": ({"prompt": "word " * 3000, "sampling_params": {"n": 2}}, "prompt_too_long", "prompt tokens"),
    }
    records = [dict(rec, id=k) for k, (rec, _) in good.items()] + [dict(rec, id=k) for k, (rec, *_) in bad.items()]
    by_id, _ = run_rows(setup, records)

    chat_text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for k, (rec, overrides) in good.items():
        row = by_id[k]
        assert row["error"] is None, (k, row["error"])
        text = rec.get("prompt") or chat_text
        assert row["prompt"] == text  # the rendered prompt (chat: the templated text)
        seed = overrides.pop("seed", derived_seed(BASE.seed, k))
        params = SamplingParams(**{"max_new_tokens": BASE.max_new_tokens, "seed": seed, **overrides})
        ref = engine.generate([text], params)[0]
        assert row["generated_tokens"] == ref.token_ids and row["generated_text"] == ref.text, k
        assert row["num_generated_tokens"] == ref.num_generated_tokens and row["finish_reason"] == ref.finish_reason
        assert json.loads(row["sampling_params"] or "null") == ({key: v for key, v in {
            **rec.get("sampling_params", {}), **({"max_new_tokens": 4} if k == "stopped" else {})}.items()
            if v is not None} or None)
        if params.n > 1:
            assert [o["generated_tokens"] for o in row["outputs"]] == [o.token_ids for o in ref.outputs]
            assert row["num_generated_tokens"] == sum(len(o["generated_tokens"]) for o in row["outputs"])
        else:
            assert row["outputs"] is None
        if params.logprobs is not None:
            assert [[e["token_id"] for e in step] for step in row["logprobs"]] == [list(d) for d in ref.logprobs]
            assert all(step[0]["token_id"] == t for step, t in zip(row["logprobs"], row["generated_tokens"]))
        else:
            assert row["logprobs"] is None
    assert by_id["stopped"]["stop_token_id"] == stop_id and by_id["stopped"]["finish_reason"] == "stop"
    assert by_id["stopped"]["stop_reason"] is None and by_id["plain"]["stop_token_id"] is None
    assert by_id["chat"]["messages"] == MESSAGES

    for k, (rec, kind, message) in bad.items():
        row = by_id[k]
        assert row["error_kind"] == kind and message in row["error"], (k, row["error"])
        assert row["generated_text"] is None and row["generated_tokens"] is None and row["num_generated_tokens"] == 0
        assert row["prompt"] == rec.get("prompt") and row.get("messages") == rec.get("messages")  # input kept


def test_output_columns_have_one_schema(setup):
    records = [{"id": "a", "prompt": PROMPTS[0], "sampling_params": {"n": 2, "logprobs": 1, "stop": ["e"]}},
               {"id": "b", "prompt": PROMPTS[1]}]
    _, table = run_rows(setup, records)
    _, errors_only = run_rows(setup, [{"id": "x", "prompt": 7}])
    _, plain_only = run_rows(setup, [{"id": "c", "prompt": PROMPTS[3]}])
    fixed = GenerateTask.output_schema
    for t in (table, errors_only, plain_only):  # whatever the rows asked for, the same typed columns
        assert pa.schema([t.schema.field(n) for n in fixed.names]) == fixed
    assert table.column("generated_tokens").type == pa.list_(pa.int64())
    assert table.column("logprobs").type.value_type.value_type.names == ["token_id", "logprob", "rank"]
    a = table.to_pylist()[0]
    assert len(a["outputs"]) == 2 and len(a["logprobs"]) == len(a["generated_tokens"])
    assert a["stop_reason"] in (None, "e") and (a["stop_reason"] == "e") == (a["finish_reason"] == "stop")
    assert errors_only.to_pylist()[0]["prompt"] == "7"  # a non-string prompt is kept as its JSON text


def test_sampling_config_keys_are_checked_by_name():
    from prepack_actor.job.config import ConfigError, GenerateConfig
    from prepack_actor.job.config_file import load_config
    cfg = load_config(GenerateConfig, ["sampling.n=3", "sampling.logprobs=2", "sampling.stop_token_ids=[5,6]",
                                       "sampling.repetition_penalty=1.1"], None)
    assert (cfg.sampling.n, cfg.sampling.logprobs, cfg.sampling.stop_token_ids) == (3, 2, [5, 6])
    task = GenerateTask(cfg.sampling, PromptsConfig())
    assert task.defaults.repetition_penalty == 1.1 and task.defaults.seed is None
    for arg, message in (("sampling.min_p=2", "sampling.min_p: expected a number in [0, 1], got 2.0"),
                         ("sampling.n=0", "sampling.n: expected an int >= 1, got 0"),
                         ("sampling.min_tokens=40", "sampling.min_tokens: expected an int <= max_new_tokens (32)")):
        with pytest.raises(ConfigError) as e:
            load_config(GenerateConfig, [arg], None)
        assert message in str(e.value)


@pytest.mark.slow
def test_job_writes_sampling_columns_every_reader_takes(tiny_model_dir, ray_local, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"id": f"r{i}", "prompt": f"{PROMPTS[i % 4]} {i}"} for i in range(6)]
    lines[1]["sampling_params"] = {"n": 1, "logprobs": None}  # null = the job's value (Parquet structs)
    lines[2]["sampling_params"] = {"top_p": 7}  # a bad value: an error row that keeps its prompt
    lines.append({"id": "chat", "messages": MESSAGES})
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    summary = load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                         f"output.path={out}", "sampling.max_new_tokens=3", "sampling.n=2",
                                         "sampling.temperature=0.8", "sampling.logprobs=1", "actors.concurrency=1",
                                         "packing.max_group_prompts=3", "output.rows_per_file=4"])
    table = pads.dataset(out, format="parquet").to_table()  # one schema across the data files
    rows = {r["id"]: r for r in table.to_pylist()}
    assert summary["rows_out"] == len(rows) == 7 and summary["files_written"] == 2
    assert rows["r2"]["error_kind"] == "bad_field" and rows["r2"]["prompt"] == lines[2]["prompt"]
    assert "sampling_params.top_p" in rows["r2"]["error"]
    tok, _ = load_tokenizer(tiny_model_dir("llama"))
    assert rows["chat"]["prompt"] == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert len(rows["r1"]["generated_tokens"]) >= 1 and rows["r1"]["outputs"] is None
    assert len(rows["r1"]["logprobs"]) == len(rows["r1"]["generated_tokens"])
    for k in ("r0", "r3", "chat"):
        r = rows[k]
        assert len(r["outputs"]) == 2 and r["outputs"][0]["generated_tokens"] == r["generated_tokens"]
        assert r["num_generated_tokens"] == sum(len(o["generated_tokens"]) for o in r["outputs"])
        assert [s[0]["token_id"] for s in r["logprobs"]] == r["generated_tokens"]
    assert summary["tokens_out"] == sum(r["num_generated_tokens"] for r in rows.values())
