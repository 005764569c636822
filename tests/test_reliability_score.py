"""The scoring job under the same real faults as the generation job, on a private local Ray:
an actor killed mid-job, injected out-of-memory, a killed driver then resume. Every run is
compared with one clean run, row for row (log-probs to 1e-4: other groupings pack differently)."""
import json
import os
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pytest

from prepack_actor.job.output import done_ids
from prepack_actor.job.storage import read_output

from job_helpers import env, kill_driver_mid_job, load_job

pytestmark = pytest.mark.slow

NUM_ROWS = 16
COMMON = ["actors.concurrency=1", "model.dtype=float32"]


def write_items(path: Path) -> Path:
    sample = resources.files("prepack_actor") / "data" / "sample_scoring.jsonl"
    lines = sample.read_text().splitlines()[:NUM_ROWS]
    path.write_text("\n".join(lines + ['{"id": "bad", "prompt": "Q?", "choices": []}']) + "\n")  # + a bad_choices row
    return path


def content(out: str) -> dict:
    """id -> (rounded log-probs, pred, pred_norm, error_kind); fails on a duplicated id."""
    rows = pa.concat_tables(list(read_output(out, "parquet")), promote_options="permissive").to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: (tuple(round(x, 4) for x in r["choice_logprobs"] or ()), r["pred"], r["pred_norm"],
                      r["error_kind"]) for r in rows}


def run_job(*args):
    return load_job("score").main(list(args))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("rels") / "items.jsonl")


@pytest.fixture(scope="module")
def clean(src, tiny_model_dir, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
            "packing.max_group_tokens=800", "packing.max_group_prompts=4", *COMMON)
    rows = content(str(out))
    assert len(rows) == NUM_ROWS + 1 and rows["bad"][-1] == "bad_choices"
    assert sum(r[-1] is None and len(r[0]) == 4 for r in rows.values()) == NUM_ROWS
    return rows


def test_actor_killed_mid_job_is_restarted_and_rows_written_once(clean, src, tiny_model_dir, tmp_path):
    marker, out = tmp_path / "crashed", tmp_path / "out"
    with env(PREPACK_FAULT_EXIT_AFTER_GROUPS=2, PREPACK_FAULT_MARKER=marker):
        summary = run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                          "packing.max_group_prompts=2", *COMMON)
    assert marker.exists(), "the injected crash did not happen"
    assert content(str(out)) == clean
    assert summary["rows_out"] == summary["rows_in"] == NUM_ROWS + 1


def test_injected_oom_is_split_not_fatal(clean, src, tiny_model_dir, tmp_path):
    """Every (sub)group above 1200 tokens raises torch.OutOfMemoryError: one group of all items
    is halved down to what fits; no error rows but the bad one, same rows as clean."""
    out = tmp_path / "out"
    with env(PREPACK_FAULT_OOM_ABOVE_TOKENS=1200):
        summary = run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                          "packing.max_group_tokens=100000", "packing.max_group_prompts=256", *COMMON)
    assert content(str(out)) == clean
    assert summary["errors_by_kind"] == {"bad_choices": 1}


def test_driver_killed_then_resume_redoes_only_the_rest(clean, src, tiny_model_dir, tmp_path):
    out, temp = tmp_path / "out", Path("/tmp") / f"rs{os.getpid()}"
    args = [f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
            "packing.max_group_prompts=1", "output.rows_per_file=2", *COMMON]  # files committed as it runs
    kill_driver_mid_job("score", args, out, temp)
    done = done_ids(str(out), "parquet")  # committed or staged
    assert 2 <= len(done) < NUM_ROWS + 1 and not (out / "_summary.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}

    summary = run_job(*args, "output.mode=resume")
    assert content(str(out)) == clean
    assert summary["rows_reused"] == len(done) and summary["rows_out"] == NUM_ROWS + 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name in before} == before  # untouched
    assert json.loads((out / "_summary.json").read_text())["rows_reused"] == len(done)
