"""The generation job at scale: many short prompts through the whole job on a local Ray.

    python benchmarks/job_scale.py --rows 100000 --max-new-tokens 8            # the issue's 100k run
    python benchmarks/job_scale.py --rows 20000 --data ../shared/data/alpaca.jsonl

Reports wall time, rows/s, time to the first data file, the driver's and the whole
session's peak memory (RSS of every process of the private Ray, sampled every 0.5 s), and
the data files (count, rows and MB each). Prompts are --data's (cycled, with the row
number in front so ids and texts differ) or short synthetic ones; tiny llama, greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "jobs"))
import generate  # noqa: E402


class PeakRSS(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants (the Ray session)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--data", help="prompt JSONL to cycle through (default: short synthetic prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--rows-per-file", type=int, default=20_000)
    ap.add_argument("--out", default="", help="output dir (default: a temp dir, removed after)")
    args = ap.parse_args()

    base = [json.loads(line)["prompt"] for line in open(args.data)] if args.data else \
        ["Write one word about the sea.", "What is 2 + 2?", "Name a colour.", "Say hello in French."]
    tmp = tempfile.mkdtemp(prefix="prepack-scale-")
    src = Path(tmp) / "in.jsonl"
    with open(src, "w") as fh:
        for i in range(args.rows):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"{i}. {base[i % len(base)]}"}) + "\n")
    out = args.out or str(Path(tmp) / "out")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    mem = PeakRSS()
    mem.start()
    t0 = time.perf_counter()
    summary = generate.main([f"input.path={src}", f"output.path={out}", "output.mode=overwrite",
                             f"output.rows_per_file={args.rows_per_file}",
                             f"sampling.max_new_tokens={args.max_new_tokens}", "actors.concurrency=1"])
    wall = time.perf_counter() - t0
    mem.stop.set()
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    files = sorted(Path(out).glob("part-*"))
    rows = [pq.read_metadata(f).num_rows for f in files]
    sizes = [f.stat().st_size / 2**20 for f in files]
    print("| rows | wall s | rows/s | first file s | driver peak MiB | session peak MiB | files | rows/file | MB/file |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    print(f"| {summary['rows_out']} | {wall:.1f} | {summary['rows_out'] / wall:.0f} | {summary['first_file_s']:.1f} "
          f"({summary['first_file_s'] / summary['wall_s']:.0%} of the run) | {driver_peak / 2**20:.0f} | "
          f"{mem.peak / 2**20:.0f} | {len(files)} | {min(rows)}-{max(rows)} | "
          f"{min(sizes):.2f}-{max(sizes):.2f} (median {statistics.median(sizes):.2f}) |")
    ray.shutdown()


if __name__ == "__main__":
    main()
