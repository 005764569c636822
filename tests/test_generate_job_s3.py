"""The generation job against a real S3 API (moto server + s3fs): read and write s3://."""
import json

import pyarrow as pa
import pytest

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.storage import filesystem, read_output

from job_helpers import load_job, write_inputs

pytestmark = pytest.mark.slow


def test_job_reads_and_writes_s3(moto_s3, tiny_model_dir, ray_local, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    fs.mkdir("prompts")
    inputs = write_inputs(tmp_path)
    for f in inputs["dir"].iterdir():
        fs.put(str(f), f"prompts/in/{f.name}")
    model_dir = tiny_model_dir("llama")

    summary = load_job("generate").main([
        f"model.path={model_dir}", "input.path=s3://prompts/in/", "output.path=s3://prompts/out/",
        "sampling.max_new_tokens=4", "packing.max_group_prompts=4"])  # endpoint from AWS_ENDPOINT_URL

    out = pa.concat_tables(list(read_output("s3://prompts/out/", "parquet")), promote_options="permissive")
    rows = {r["id"]: r for r in out.to_pylist()}
    assert out.num_rows == len(rows) == inputs["num_rows"] == summary["rows_in"]
    assert {k: rows[k]["error_kind"] for k in inputs["bad"]} == inputs["bad"]
    assert any(f.endswith(".parquet") for f in fs.ls("prompts/out/"))

    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    for k in ("p0", "pq0", "a.jsonl:2"):
        ref = engine.generate([rows[k]["prompt"]], SamplingParams(max_new_tokens=4))[0]
        assert rows[k]["generated_text"] == ref.text and rows[k]["num_generated_tokens"] == ref.num_generated_tokens

    s3, root = filesystem("s3://prompts/out/_summary.json")
    on_s3 = json.loads(s3.cat(root))
    assert on_s3["rows_out"] == inputs["num_rows"] and on_s3["rows_error"] == len(inputs["bad"])
    assert on_s3["tokens_out"] == sum(r["num_generated_tokens"] for r in rows.values())
    assert on_s3["config"]["input"]["path"] == "s3://prompts/in/"


def test_lease_on_s3_is_a_conditional_put(moto_s3):
    """Two jobs on one s3:// output: the second is refused by the store itself (If-None-Match)."""
    import s3fs

    from prepack_actor.job.lease import LEASE_NAME, LeaseError, acquire_lease
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}).mkdir("leases")
    first = acquire_lease("s3://leases/out/", None, ttl_s=30)
    with pytest.raises(LeaseError, match=first.owner):
        acquire_lease("s3://leases/out/", None, ttl_s=30)
    fs, root = filesystem(f"s3://leases/out/{LEASE_NAME}")
    with pytest.raises(FileExistsError):  # not a check-then-write: the PUT itself is refused
        fs.pipe_file(root, b"{}", mode="create")
    first.release()
    acquire_lease("s3://leases/out/", None, ttl_s=30).release()
