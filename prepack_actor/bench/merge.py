"""Merge results.json of several benchmark runs (e.g. one per dataset, run in turn on a
busy machine) into one results.json with plots and the table.

    python -m prepack_actor.bench.merge results/run-a results/run-b --out results/benchmark
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import report


def merge(dirs: list[str], out: str) -> dict:
    parts = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    merged = {"runs": [{"dir": d, "config": p["config"], "wall_s": p["wall_s"]} for d, p in zip(dirs, parts)],
              "environment": parts[0]["environment"],
              "prefill": [r for p in parts for r in p["prefill"]],
              "generation": [r for p in parts for r in p["generation"]],
              "largest_batch": [r for p in parts for r in p["largest_batch"]],
              "notes": list(dict.fromkeys(n for p in parts for n in p["notes"] if not n.endswith(": -")))}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "results.json", merged)
    report.plot(merged["prefill"], "speedup_vs_full", "prefill speedup vs full batching", out_dir / "speedup.png")
    report.plot(merged["prefill"], "peak_memory_bytes", "peak prefill memory (MiB)", out_dir / "peak_memory.png",
                scale=1 / 2**20)
    report.plot_generation(merged["generation"], out_dir / "generation.png")
    print(report.markdown(merged["prefill"], merged["generation"], merged["largest_batch"], merged["notes"]))
    return merged


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="benchmark output dirs holding results.json")
    ap.add_argument("--out", required=True, help="output dir for the merged results.json and plots")
    args = ap.parse_args()
    merge(args.dirs, args.out)
