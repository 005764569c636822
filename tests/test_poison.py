"""Every row is data, one writer per output, paths and models that cannot hurt (no Ray work).

The job runs of the same inputs are in test_poison_job.py (slow); docs/failure.md lists
which test proves which guarantee.
"""
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.actor import PrepackActor
from prepack_actor.job.carry import carried_conflicts, carried_record, is_json
from prepack_actor.job.config import (ConfigError, GenerateConfig, ModelConfig, PackingConfig, ProcessorConfig,
                                      PromptsConfig, SamplingConfig)
from prepack_actor.job.config_file import load_config
from prepack_actor.job.generate import GenerateTask
from prepack_actor.job.lease import LEASE_NAME, Lease, LeaseError, acquire_lease
from prepack_actor.job.paths import path_conflict
from prepack_actor.job.retry import release_retryable
from prepack_actor.job.rows import mark_repeat
from prepack_actor.job.scan import combine, scan_shard
from prepack_actor.job.storage import read_output, table_bytes
from prepack_actor.job.writer import part_name
from prepack_actor.models import load_tokenizer
from prepack_actor.tiny import build_tiny_model

from job_helpers import BIG_DOC, PROMPTS, REPO, load_job, poison_shards

TASK = GenerateTask(SamplingConfig(max_new_tokens=2), PromptsConfig())


def errors(capsys) -> list[str]:
    """The job's error lines on stderr (progress bars of a model built on the way aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "config error"))]


def parsed_poison(tmp_path, tok, policy="error"):
    """Both poison shards parsed, scanned, marked and prepared as the job does (scan.py,
    read.py, the task's prepare)."""
    from prepack_actor.job.rows import parse_jsonl_shard
    shards = poison_shards(tmp_path)
    scans = [scan_shard((shards["dir"] / n).read_bytes(), n, n, "jsonl", set(TASK.output_schema.names))
             for n in ("a.jsonl", "b.jsonl")]
    scan = combine(scans)
    rows = []
    for s in scans:
        parsed = parse_jsonl_shard((shards["dir"] / s.name).read_bytes(), s.name)
        for i, (k, first) in scan.repeats.get(s.path, {}).items():
            mark_repeat(parsed[i], k, first, policy)
        rows += [TASK.prepare_row(r, tok, 2048) for r in parsed]
    return shards, scan, rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("llama"))[0]


def test_every_poison_line_becomes_a_row_with_a_unique_id(tmp_path, tok):
    shards, scan, rows = parsed_poison(tmp_path, tok)
    assert scan.rows_in == len(rows) == len(shards["expected"]) == 35
    kinds = {r["id"]: r["error_kind"] for r in rows}
    assert len(kinds) == len(rows)  # unique ids: "1" vs 1, repeats within and across shards
    assert kinds == shards["expected"]
    by_id = {r["id"]: r for r in rows}
    assert "lone UTF-16 surrogate \\ud800" in by_id["surr"]["error"] and "note" in by_id["surr-carry"]["error"]
    assert by_id["mnt-big"]["error"] == "sampling_params.max_new_tokens: expected an int <= 2147483647, got 2147483648"
    assert by_id["seed-big"]["error"].startswith("sampling_params.seed: expected an int <= 9223372036854775807")
    assert by_id["seed-max"]["seed"] == 2 ** 63 - 1 and by_id["g2"]["prompt"] == "smile \U0001F600 please"
    assert by_id["dup#2"]["error"].startswith("duplicate id 'dup' (first at a.jsonl line 19), written as 'dup#2'")
    assert by_id["dup#1"]["prompt"] == PROMPTS[2]  # a duplicate_id row keeps its prompt
    assert "nested deeper than 100 levels" in by_id["deep"]["error"]
    assert "RecursionError" in by_id["a.jsonl:25"]["error"] and "digits" in by_id["a.jsonl:26"]["error"]
    assert part_name(["a\nb"], "parquet") != part_name(["a", "b"], "parquet")  # file names: ids never collide
    # suffix: the same ids, the repeats run
    _, _, rows = parsed_poison(tmp_path / "s", tok, policy="suffix")
    assert {r["id"] for r in rows} == set(kinds)
    assert {r["id"]: r["error_kind"] for r in rows}["x#2"] is None


def test_carried_columns_have_one_schema_in_any_group(tmp_path, tok):
    """Each row alone (a group of one) gives the same schema as all rows together; values
    that cannot share an Arrow type are JSON text, read back with json.loads."""
    _, scan, rows = parsed_poison(tmp_path, tok)
    sigs = {k: str(scan.carried.field(k).type) + ("/json" if is_json(scan.carried.field(k)) else "")
            for k in scan.carried.names}
    assert sigs == {"meta": "string/json", "tags": "list<item: string>",
                    "nested": "struct<k: struct<j: list<item: int64>>>", "empty": "string/json",
                    "big": "string/json", "score": "string/json", "messages": "string/json", "doc": "string"}
    out = [TASK.output_row(r) for r in rows]
    whole = TASK.to_table(out, scan.carried)
    for r in out:
        one = TASK.to_table([r], scan.carried)
        assert one.schema.equals(whole.schema, check_metadata=True)
        pq.read_table(io.BytesIO(table_bytes(one, "parquet")))  # Parquet takes every group
    got = {r["id"]: r for r in whole.to_pylist()}
    assert [json.loads(got[i]["meta"]) for i in ("g0", "g1", "g9")] == [1, "one", 5]
    assert json.loads(got["g1"]["big"]) == 2 ** 70 and json.loads(got["g1"]["empty"]) == {}
    assert got["g2"]["score"] == "NaN" and got["g9"]["nested"] == {"k": {"j": [3]}}
    assert json.loads(got["msg-str"]["messages"]) == "hello" and json.loads(got["chat"]["messages"])[0]["role"]
    assert got["big-doc"]["doc"] == BIG_DOC and got["g0"]["tags"] == ["a"]
    # resume: an input whose column changed type is refused, naming the column
    record = carried_record(scan.sigs)
    assert carried_conflicts(record, scan.sigs) == []
    assert carried_conflicts({"columns": dict(record["columns"], tags="int64")}, scan.sigs) == [
        "tags: int64 -> list<item: string>"]


def test_failing_prompt_marks_only_itself(tmp_path):
    """A gpt2 with 32 positions and prompts.max_prompt_tokens=100: the 40-token prompt fails in
    the model (position embedding out of range); its group is halved down to it; the others
    equal the engine on each prompt alone."""
    path = str(build_tiny_model("gpt2", tmp_path / "gpt2", max_positions=32))
    tok, ctx = load_tokenizer(path)
    task = GenerateTask(SamplingConfig(max_new_tokens=3), PromptsConfig(max_prompt_tokens=100))
    long = " ".join(["sea"] * 40)
    texts = ["Hello there", long, "What is the capital of France?", "Explain"]
    rows = [task.prepare_row({"id": f"r{i}", "prompt": t, "messages": None, "max_new_tokens": None, "seed": None,
                              "error": None, "error_kind": None, "carry": {}}, tok, ctx) for i, t in enumerate(texts)]
    assert rows[1]["error"] is None and rows[1]["num_input_tokens"] > 32
    actor = PrepackActor(ProcessorConfig(model=ModelConfig(path=path, device="cpu"), sampling=task.sampling,
                                         prompts=task.prompts, packing=PackingConfig(max_group_prompts=64)))
    out = {r["id"]: r for r in actor.run_group(rows)}
    assert out["r1"]["error_kind"] == "engine_error" and "IndexError" in out["r1"]["error"]
    model, tok = load_model(path, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    for i in (0, 2, 3):
        ref = engine.generate([texts[i]], SamplingParams(max_new_tokens=3))[0]
        assert out[f"r{i}"]["error"] is None and out[f"r{i}"]["generated_text"] == ref.text


# ---- one writer per output path ---------------------------------------------------------
def test_lease_refuses_a_second_holder_and_expires(tmp_path):
    out = str(tmp_path / "out")
    first = acquire_lease(out, None, ttl_s=30)
    with pytest.raises(LeaseError) as e:
        acquire_lease(out, None, ttl_s=30)
    assert first.owner in str(e.value) and "in use by another job" in str(e.value) and "\n" not in str(e.value)
    first.release()
    assert not (tmp_path / "out" / LEASE_NAME).exists()

    stale = Lease(out, None, ttl_s=0.2).acquire()  # a killed job: never released, never renewed again
    stale._stop.set()
    time.sleep(0.3)
    taker = acquire_lease(out, None, ttl_s=30)  # expired: taken over
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["owner"] == taker.owner
    stale.renew()  # the old holder notices at its next renewal and stops
    with pytest.raises(LeaseError, match="taken over by"):
        stale.check()
    taker.release()

    import subprocess
    from prepack_actor.job.lease import _machine
    dead = subprocess.Popen(["true"])
    dead.wait()  # a job on this machine, killed: its process is gone, its lease not yet expired
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps({"owner": "gone", "pid": dead.pid, **_machine(),
                                                           "expires_at": time.time() + 3600}))
    acquire_lease(out, None, ttl_s=30).release()  # taken over at once


def test_second_job_on_a_held_output_fails_with_one_line(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    held = acquire_lease(str(tmp_path / "out"), None, ttl_s=30)  # the other job
    try:
        with pytest.raises(SystemExit) as e:
            load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                       f"output.path={tmp_path / 'out'}"])
    finally:
        held.release()
    err = errors(capsys)
    assert e.value.code == 1 and len(err) == 1 and held.owner in err[0] and "in use by another job" in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # nothing written, lease released


# ---- paths that cannot hurt -------------------------------------------------------------
def test_paths_that_would_hurt_the_input_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("{}\n")
    src = str(data / "in.jsonl")
    assert "would delete the input" in path_conflict(src, str(data), "overwrite")
    assert path_conflict(src, str(data), "resume") is None  # a file input beside its output is fine
    assert "is inside input.path" in path_conflict(str(data), str(data / "out"), "resume")
    assert "is the input.path" in path_conflict(str(data), str(data) + "/", "resume")
    assert "is inside input.path" in path_conflict(str(data / "*.jsonl"), str(data / "out"), "resume")
    assert "would delete the input" in path_conflict(str(data), str(tmp_path), "overwrite")
    assert path_conflict(str(data), str(tmp_path / "out"), "overwrite") is None


def test_overwrite_refuses_a_path_holding_the_input_or_not_written_by_a_job(tiny_model_dir, ray_local, tmp_path,
                                                                             capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for out, expect in ((data, "would delete the input"), (other, "was not written by this job")):
        with pytest.raises(SystemExit):
            load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={data / 'in.jsonl'}",
                                       f"output.path={out}", "output.mode=overwrite",
                                       "actors.placement_timeout_s=5"])
        assert expect in capsys.readouterr().err
    assert (data / "in.jsonl").exists() and (other / "notes.txt").read_text() == "keep me"


# ---- resume: retryable rows, unreadable files ---------------------------------------------
def test_release_retryable_keeps_row_errors_and_names_unreadable_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"id": "ok", "error_kind": None, "x": "2024-01-01"}, {"id": "oom", "error_kind": "out_of_memory"},
            {"id": "bad", "error_kind": "invalid_json"}, {"id": "eng", "error_kind": "engine_error"}]
    (out / "part-a.jsonl").write_bytes(table_bytes(pa.Table.from_pylist(rows), "jsonl"))
    pq.write_table(pa.Table.from_pylist(rows[3:]), out / "part-b.parquet")
    assert release_retryable(str(out), "jsonl") == 2
    assert [json.loads(line)["id"] for line in (out / "part-a.jsonl").read_text().splitlines()] == ["ok", "bad"]
    assert json.loads((out / "part-a.jsonl").read_text().splitlines()[0])["x"] == "2024-01-01"  # byte for byte
    assert release_retryable(str(out), "parquet") == 1 and not (out / "part-b.parquet").exists()
    (out / "part-c.jsonl").write_text('{"id": "cut", "prompt": "trunc')
    from prepack_actor.job.storage import UnreadableOutput
    with pytest.raises(UnreadableOutput, match="part-c.jsonl"):
        list(read_output(str(out), "jsonl", columns=["id"]))


# ---- fail fast on what cannot run ---------------------------------------------------------
@pytest.mark.parametrize("device", ["cdua", "cuda:x", "gpu", "cuda:-1"])
def test_bad_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match="model.device: expected auto, cpu, cuda, cuda:N or mps"):
        load_config(GenerateConfig, [f"model.device={device}"], REPO / "conf" / "generate.yaml")
    assert ModelConfig(device="cuda:1").device == "cuda:1"


def test_custom_code_checkpoint_is_refused_without_a_prompt(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint whose config names its own Python classes (auto_map): refused with one
    line, the code never runs, nothing asks on the terminal; trust_remote_code=true runs it."""
    import shutil
    ckpt = tmp_path / "custom"
    shutil.copytree(tiny_model_dir("llama"), ckpt)
    marker = tmp_path / "code-ran"
    (ckpt / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'prepack-custom'\n")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="prepack-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (ckpt / "config.json").write_text(json.dumps(config))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    with pytest.raises(SystemExit) as e:
        load_job("generate").main([f"model.path={ckpt}", f"input.path={src}", f"output.path={tmp_path / 'out'}"])
    err = errors(capsys)
    assert e.value.code == 1 and len(err) == 1 and "model.trust_remote_code=true" in err[0]
    assert not asked and not marker.exists()
    load_tokenizer(str(ckpt), True)  # permission given: the checkpoint's code runs
    assert marker.exists() and not asked


def test_gpu_pool_on_a_cpu_cluster_fails_with_one_line(tiny_model_dir, ray_local, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                   f"output.path={tmp_path / 'out'}", "actors.gpus_per_actor=1",
                                   "actors.placement_timeout_s=2"])
    err = errors(capsys)
    assert e.value.code == 1 and len(err) == 1 and time.time() - t0 < 60
    assert "cannot place the actor pool" in err[0] and "actors.gpus_per_actor=1" in err[0] and "0 GPUs" in err[0]
    assert not (tmp_path / "out" / LEASE_NAME).exists()
