"""Group sizes for varlen prefill: Engine.prefill time over a grid of (max_group_prompts, max_group_tokens).

    python benchmarks/group_sweep.py --data ../shared/data --model artifacts/llama-small \
        --n 128 --prompts 32,64,128,256 --tokens 8192,16384,65536 --repeats 3

One torch thread, fp32, the same prompts for every setting, settings interleaved within
each repeat; prints median CPU seconds and real tokens per CPU second per setting and dataset.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--datasets", default="alpaca,mmlu")
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--prompts", default="32,64,128,256")
    ap.add_argument("--tokens", default="16384")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from prepack_actor import Engine, EngineConfig, load_model

    torch.set_num_threads(1)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    data = {name: [tok(json.loads(line)["prompt"])["input_ids"]
                   for line in (Path(args.data) / f"{name}.jsonl").read_text().splitlines()[: args.n]]
            for name in args.datasets.split(",")}
    grid = [(p, t) for p in map(int, args.prompts.split(",")) for t in map(int, args.tokens.split(","))]
    engines = {g: Engine(model, tok, EngineConfig(max_group_prompts=g[0], max_group_tokens=g[1])) for g in grid}
    engines[grid[0]].prefill([x[:8] for x in list(data.values())[0][:4]])  # warm-up
    times = {(name, g): [] for name in data for g in grid}
    for rep in range(args.repeats):
        for name, ids in data.items():
            for g in grid[rep % len(grid):] + grid[: rep % len(grid)]:  # rotate the order each repeat
                t = time.process_time()  # CPU seconds: robust to other work on a shared machine
                engines[g].prefill(ids)
                times[name, g].append(time.process_time() - t)
    print("| dataset | max_group_prompts | max_group_tokens | groups | prefill CPU s (median) | real tok / CPU s |")
    print("|---|---|---|---|---|---|")
    for (name, g), ts in times.items():
        ids = data[name]
        groups = len(engines[g].groups([len(x) for x in ids]))
        med = statistics.median(ts)
        print(f"| {name} | {g[0]} | {g[1]} | {groups} | {med:.2f} | {sum(map(len, ids)) / med:.0f} |")


if __name__ == "__main__":
    main()
