"""What the Ray job costs over the engine: the same prompts, greedy, output lengths fixed or varied.

    python benchmarks/job_overhead.py --data ../shared/data/alpaca.jsonl   # 2,000 prompts x 64 tokens, tiny llama
    python benchmarks/job_overhead.py --data ../shared/data/alpaca.jsonl --num-prompts 500 --size small
    # groups on one shared running batch (default) vs one group at a time, output lengths 8..256:
    python benchmarks/job_overhead.py --data ../shared/data/alpaca.jsonl --num-prompts 256 --size small \
        --varied --concurrent-batches 1,0 --repeats 2

A: `Engine.generate` called directly in this process (model already loaded).
B: the whole job (`jobs/generate.py`: read, parse, tokenize, group, one actor, write,
   summary) on a private local Ray with one CPU actor; its wall time starts after
   `ray.init` and includes the actor's model load.
Both use `--threads` torch threads (an actor with one CPU gets one thread) and
ignore_eos, so both generate exactly num_prompts x max_new_tokens tokens (`--varied`: each
row's max_new_tokens drawn from 8..256, seed 0). `--concurrent-batches 1,0` runs the job once
per value of actors.max_concurrent_batches (1: one group per actor call at a time; 0: the
default, groups share the actor's running batch); `--repeats` interleaves everything and
prints medians.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

from prepack_actor import Engine, EngineConfig, SamplingParams, load_model  # noqa: E402
from prepack_actor.models import resolve_model_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prompt JSONL, e.g. ../shared/data/alpaca.jsonl")
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny", help="tiny llama size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, engine and actor")
    ap.add_argument("--max-group-tokens", type=int, default=4096)
    ap.add_argument("--max-group-prompts", type=int, default=64)
    ap.add_argument("--varied", action="store_true", help="per-row max_new_tokens from 8..256 (seed 0)")
    ap.add_argument("--concurrent-batches", default="0", help="actors.max_concurrent_batches values, e.g. 1,0")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    model_path = resolve_model_path(f"tiny:llama:{args.size}", REPO / "artifacts" / "models")
    rows = [json.loads(line) for line in open(args.data) if line.strip()][: args.num_prompts]
    prompts = [r["prompt"] for r in rows]
    rng = random.Random(0)
    news = [rng.randint(8, 256) if args.varied else args.max_new_tokens for _ in rows]
    for r, n in zip(rows, news):
        r["max_new_tokens"] = n
    n_tokens = sum(news)
    concurrent = [int(x) for x in args.concurrent_batches.split(",")]

    torch.set_num_threads(args.threads)
    model, tok = load_model(model_path, dtype="float32", device="cpu")
    engine = Engine(model, tok, EngineConfig(max_group_prompts=args.max_group_prompts, max_group_tokens=args.max_group_tokens))
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]

    import ray
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for rep in range(args.repeats):
                # A: the engine alone, same grouping budgets as the job.
                t0 = time.perf_counter()
                results = engine.generate(prompts, params)
                times.setdefault("engine direct", []).append(time.perf_counter() - t0)
                assert sum(r.num_generated_tokens for r in results) == n_tokens
                # B: the whole job on a private local Ray, one CPU actor (wall_s includes its model load).
                for k in concurrent:
                    summary = job.main([f"model.path={model_path}", f"input.path={src}", f"output.path={tmp}/out{rep}_{k}",
                                        "sampling.ignore_eos=true",
                                        f"packing.max_group_tokens={args.max_group_tokens}",
                                        f"packing.max_group_prompts={args.max_group_prompts}",
                                        "actors.concurrency=1", f"actors.torch_threads={args.threads}",
                                        f"actors.max_concurrent_batches={k}"])
                    assert summary["tokens_out"] == n_tokens, summary["tokens_out"]
                    times.setdefault(f"job, max_concurrent_batches={k}", []).append(summary["wall_s"])
                    print(f"repeat {rep}: job k={k} {summary['wall_s']:.2f} s, engine {times['engine direct'][-1]:.2f} s",
                          flush=True)
        finally:
            ray.shutdown()

    engine_s = statistics.median(times["engine direct"])
    print(f"\nmodel: tiny llama ({args.size}), {len(prompts)} prompts, {n_tokens} new tokens "
          f"({'8..256 each' if args.varied else args.max_new_tokens}), {args.threads} torch thread(s), CPU, "
          f"medians of {args.repeats}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:32s}: {t:8.2f} s  {n_tokens / t:9.1f} generated tokens/s  engine / this {engine_s / t:.2f}")


if __name__ == "__main__":
    main()
