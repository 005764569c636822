"""The output folder: sized data files, one schema every reader takes, incremental resume."""
import json

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray

from prepack_actor.job.storage import read_output
from prepack_actor.job.writer import Committer, stage_stage, unify_schemas

from job_helpers import load_job

pytestmark = pytest.mark.slow


def write_rows(path, ids, extra=None):
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{i} says " + "hi " * (i % 4 + 1),
                                        **({"tag": f"t{i}"} if extra and i in extra else {})}) + "\n"
                            for i in ids))
    return path


def run(model, src, out, *more):
    return load_job("generate").main([f"model.path={model}", f"input.path={src}", f"output.path={out}",
                                      "sampling.max_new_tokens=1", "actors.concurrency=1", *more])


def test_5000_rows_with_a_1000_row_target_give_5_files_every_reader_takes(tiny_model_dir, ray_local, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", range(5000), extra={7, 4321})  # a carried column in 2 rows only
    out = tmp_path / "out"
    summary = run(tiny_model_dir("llama"), src, out, "output.rows_per_file=1000", "packing.max_group_prompts=64")
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 5 and [pq.read_metadata(f).num_rows for f in files] == [1000] * 5
    assert summary["files_written"] == 5 and summary["rows_out"] == 5000 and summary["first_file_s"] > 0
    assert len({str(pq.read_schema(f).remove_metadata()) for f in files}) == 1  # one schema
    frame = pd.read_parquet(out)  # the standard readers take the folder as it is
    assert len(frame) == 5000 and frame["id"].is_unique and set(frame.loc[frame["tag"].notna(), "id"]) == {"r7", "r4321"}
    assert pads.dataset(str(out)).count_rows() == 5000
    assert ray.data.read_parquet(str(out)).count() == 5000
    assert not (out / "_staging").exists() and (out / "_summary.json").exists()


def test_rerun_on_a_grown_input_processes_exactly_the_new_rows(tiny_model_dir, ray_local, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    write_rows(src, range(30))
    first = run(tiny_model_dir("llama"), src, out, "output.rows_per_file=10")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert first["rows_new"] == 30 and len(before) == 3
    write_rows(src, range(45))  # the nightly input gained 15 rows
    again = run(tiny_model_dir("llama"), src, out, "output.rows_per_file=10")
    assert (again["rows_in"], again["rows_reused"], again["rows_new"], again["rows_out"]) == (45, 30, 15, 45)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name in before} == before
    ids = [i for t in read_output(str(out), "parquet", columns=["id"]) for i in t.column("id").to_pylist()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(45))  # each id once


def test_changed_settings_are_named_key_by_key(tiny_model_dir, ray_local, tmp_path, capsys):
    src, out = write_rows(tmp_path / "in.jsonl", range(4)), tmp_path / "out"
    run(tiny_model_dir("llama"), src, out)
    with pytest.raises(SystemExit):
        run(tiny_model_dir("llama"), src, out, "sampling.temperature=0.5")
    assert "sampling.temperature: 0.0 -> 0.5" in capsys.readouterr().err


def test_committer_cuts_exact_files_and_drops_rows_seen_again(tmp_path):
    out = str(tmp_path / "out")
    groups = [pa.table({"id": [f"g{g}-{i}" for i in range(n)], "x": list(range(n))}) for g, n in enumerate((3, 4, 2, 5))]
    c = Committer(out, "parquet", None, rows_per_file=4, file_mb=0)
    for t in groups + groups[:1]:  # the first group staged and seen twice (a re-executed task)
        c.add(stage_stage(t, out, None).column("file")[0].as_py())
    c.finish()
    files = sorted((tmp_path / "out").glob("part-*"))
    assert sorted(pq.read_metadata(f).num_rows for f in files) == [2, 4, 4, 4]
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 14


def test_unify_schemas_adds_missing_columns_as_nulls(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "x": [1]}), tmp_path / "part-a.parquet")
    pq.write_table(pa.table({"id": ["b"], "y": ["t"]}), tmp_path / "part-b.parquet")
    assert unify_schemas(str(tmp_path)) == 2
    table = pads.dataset(str(tmp_path)).to_table().sort_by("id")
    assert table.to_pydict() == {"id": ["a", "b"], "x": [1, None], "y": [None, "t"]}
