"""The benchmark's library and job: same prompts for every method, hand-checked
predictors, honest measurement helpers, and a tiny end-to-end run (JSON + plots)."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from prepack_actor.bench.config import BenchmarkConfig
from prepack_actor.bench.measure import PeakMemory, interleaved, summarize
from prepack_actor.bench.workload import (batch_size_reduction, ideal_speedup, make_workload,
                                          max_abs_deviation, predictors)
from prepack_actor.job.config import ConfigError
from prepack_actor.job.config_file import load_config

ROOT = Path(__file__).resolve().parent.parent


def _job():
    spec = importlib.util.spec_from_file_location("benchmark_job", ROOT / "jobs" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_method_sees_the_same_prompts():
    ids = [[7] * n for n in range(1, 41)]
    wl = make_workload("d", ids, batch_size=8, num_batches=3, seed=0)
    assert len(wl.prompts) == 24
    full, packed, ordered = (wl.batches(m) for m in ("full_batching", "prepacking", "length_ordered"))
    assert full == packed == wl.batches("prepacking_best")  # identical batches, identical order
    flat = lambda bs: Counter(tuple(p) for b in bs for p in b)  # noqa: E731
    assert flat(full) == flat(ordered)  # the same prompts, cut differently
    assert [len(b) for b in ordered] == [8, 8, 8]
    lens = [len(p) for b in ordered for p in b]
    assert lens == sorted(lens)
    # The sample is seeded: the same seed gives the same prompts, another seed others.
    assert make_workload("d", ids, 8, 3, seed=0).prompts == wl.prompts
    assert make_workload("d", ids, 8, 3, seed=1).prompts != wl.prompts


def test_ideal_speedup_and_predictors_hand_checked():
    assert ideal_speedup([[1, 2, 3]]) == pytest.approx(9 / 6)
    assert ideal_speedup([[1, 3], [2, 2]]) == pytest.approx((6 + 4) / 8)  # padded / real over batches
    assert ideal_speedup([[5, 5, 5]]) == 1.0
    assert max_abs_deviation([1, 2, 3, 6]) == 3.0  # mean 3
    assert max_abs_deviation([4, 4]) == 0.0
    lengths = [4, 4, 2, 2, 1, 1, 1, 1]  # FFD at 4: [4] [4] [2 2] [1 1 1 1]
    assert batch_size_reduction(lengths) == 2.0
    assert batch_size_reduction(lengths, capacity_multiple=2.0) == 4.0  # [4 4] [2 2 1 1 1 1]
    assert batch_size_reduction(lengths, min_width=16) == 8.0  # one row of 16 tokens
    p = predictors([[1, 3], [2, 2]])
    assert p["real_tokens"] == 8 and p["padded_tokens"] == 10
    assert p["max_abs_deviation"] == pytest.approx((1 + 0) / 2)


def test_config_rejects_unknown_keys_bad_types_and_methods():
    yaml = ROOT / "conf" / "benchmark.yaml"
    cfg = load_config(BenchmarkConfig, ["batch_sizes=[32,64]", "datasets=[a.jsonl]"], yaml)
    assert cfg.batch_sizes == [32, 64] and cfg.datasets == ["a.jsonl"]
    for argv, key in ((["batch_size=4"], "batch_size"), (["repeats=three"], "repeats"),
                      (["methods=[magic]"], "methods"), (["batch_sizes=[0]"], "batch_sizes")):
        with pytest.raises(ConfigError, match=key):
            load_config(BenchmarkConfig, argv, yaml)


def test_peak_memory_sees_a_transient_allocation_on_cpu():
    with PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(16 * 2**20)  # 64 MiB, freed before the block ends
        del x
    assert m.bytes >= 60 * 2**20
    with PeakMemory(torch.device("cpu")) as small:
        y = torch.ones(1024)
        del y
    assert small.bytes < 16 * 2**20


def test_interleaved_rotates_methods_and_drops_warmup():
    calls = []

    def runner(name):
        def run(warm):
            calls.append((name, warm))
            return {"t": float(len(calls))}
        return run

    out = interleaved({n: runner(n) for n in "ABC"}, repeats=2, warmup=1)
    assert [c[0] for c in calls] == list("ABC" "BCA" "CAB")
    assert [c[1] for c in calls[:3]] == [True] * 3 and not any(c[1] for c in calls[3:])
    assert {n: len(v) for n, v in out.items()} == {"A": 2, "B": 2, "C": 2}
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}


def test_tiny_end_to_end_writes_json_plots_and_table(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    texts = ["Hi", "Name three colours of the rainbow.", "What is two plus two? Answer briefly please.",
             "Write one sentence about the sea.", "A", "Explain photosynthesis to a child in a few words.",
             "List four animals", "Translate hello into French and Spanish and German."]
    data.write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    payload = _job().main([f"model={tiny_model_dir('llama')}", f"datasets=[{data}]", f"generate_datasets=[{data}]",
                           "batch_sizes=[4]", "num_batches=2", "repeats=1", "warmup=0", "generate_repeats=1",
                           "generate_batch_size=4", "new_tokens=3", f"output_dir={out}"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["prefill"] == json.loads(json.dumps(payload["prefill"]))
    recs = {r["method"]: r for r in saved["prefill"]}
    assert set(recs) == {"full_batching", "length_ordered", "prepacking", "prepacking_best", "prepacking_varlen"}
    ideal = {r["ideal_speedup"] for r in recs.values()}
    assert len(ideal) == 1  # one reference: the random batches' padded / real tokens
    for r in recs.values():
        assert r["dataset"] == "prompts" and r["batch_size"] == 4
        assert r["prefill_s"] > 0 and r["prefill_s_min"] <= r["prefill_s"] <= r["prefill_s_max"]
        assert r["peak_memory_bytes"] >= 0 and r["real_tokens"] == recs["full_batching"]["real_tokens"]
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup_vs_full"] / r["ideal_speedup"])
    assert recs["full_batching"]["speedup_vs_full"] == 1.0 and recs["full_batching"]["rows_per_batch"] == 4
    assert recs["prepacking"]["rows_per_batch"] < 4  # packing merged rows
    assert recs["prepacking_varlen"]["rows_per_batch"] == 1 and recs["prepacking_varlen"]["mask_s"] == 0  # one stream
    assert recs["length_ordered"]["padded_tokens"] <= recs["full_batching"]["padded_tokens"]
    assert 0 <= recs["prepacking"]["overhead_share"] < 1
    gen = {r["method"]: r for r in saved["generation"]}
    assert set(gen) == {"full_batching_generate", "hf_continuous_batching", "prepack_engine"}
    assert all(r["output_tokens"] == 4 * 3 for r in gen.values())  # the same work for every method
    for name in ("speedup.png", "peak_memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("largest batch that fits: skipped" in n for n in saved["notes"])
    printed = capsys.readouterr().out
    assert "| prompts | 4 | prepacking |" in printed and "prepack_engine" in printed


def test_cpu_clock_counts_work_not_waiting():
    import time as _time

    from prepack_actor.bench import measure

    with pytest.raises(ConfigError, match="clock"):
        BenchmarkConfig(datasets=["x.jsonl"], clock="gpu")
    seconds = {}
    try:
        for name in ("wall", "cpu"):
            measure.use_clock(name)
            clock = measure.Clock(torch.device("cpu"))
            clock.mark()
            _time.sleep(0.3)  # waiting: wall time passes, CPU time does not
            clock.mark()
            seconds[name] = clock.seconds()[0]
    finally:
        measure.use_clock("wall")
    assert seconds["wall"] >= 0.3 and seconds["cpu"] < 0.1
