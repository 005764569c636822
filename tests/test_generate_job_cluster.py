"""`ray job submit` against a real `ray start --head` cluster on loopback."""
import json
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.storage import read_output

from conftest import RAY_BIN
from job_helpers import REPO

pytestmark = pytest.mark.slow


def test_ray_job_submit(ray_cluster, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    src = tmp_path / "prompts.jsonl"
    prompts = [f"Question {i}: " + "why is the sky blue? " * (1 + i % 5) for i in range(12)]
    src.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": p, "n": i}) for i, p in enumerate(prompts)))
    out = tmp_path / "out"
    sid = f"gen-{uuid.uuid4().hex[:8]}"
    env = ray_cluster["env"]
    submit = [RAY_BIN, "job", "submit", "--address", ray_cluster["address"], "--submission-id", sid,
              "--working-dir", str(REPO), "--no-wait", "--", sys.executable, "jobs/generate.py",
              f"model.path={model_dir}", f"input.path={src}", f"output.path={out}", "output.format=jsonl",
              "sampling.max_new_tokens=5", "packing.max_group_prompts=4", "actors.concurrency=1"]
    p = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    client = JobSubmissionClient(ray_cluster["address"])
    status = None
    deadline = time.time() + 180
    while time.time() < deadline:
        status = client.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = subprocess.run([RAY_BIN, "job", "logs", "--address", ray_cluster["address"], sid],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "rows_out" in logs and "tokens_out_per_s" in logs  # the summary table is printed

    rows = {r["id"]: r for r in pa.concat_tables(list(read_output(str(out), "jsonl"))).to_pylist()}
    assert sorted(rows) == sorted(f"q{i}" for i in range(12))
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    for i, p in enumerate(prompts):
        ref = engine.generate([p], SamplingParams(max_new_tokens=5))[0]
        r = rows[f"q{i}"]
        assert r["error"] is None and r["n"] == i
        assert r["generated_text"] == ref.text and r["num_input_tokens"] == ref.num_input_tokens
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 12 and summary["rows_error"] == 0
