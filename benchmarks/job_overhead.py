"""What the Ray job costs over the engine: the same prompts, greedy, fixed output length.

    python benchmarks/job_overhead.py --data ../shared/data/alpaca.jsonl   # 2,000 prompts x 64 tokens, tiny llama
    python benchmarks/job_overhead.py --data ../shared/data/alpaca.jsonl --num-prompts 500 --size small

A: `Engine.generate` called directly in this process (model already loaded).
B: the whole job (`jobs/generate.py`: read, parse, tokenize, group, one actor, write,
   summary) on a private local Ray with one CPU actor; its wall time starts after
   `ray.init` and includes the actor's model load.
Both use `--threads` torch threads (an actor with one CPU gets one thread) and
ignore_eos, so both generate exactly num_prompts x max_new_tokens tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
    args = ap.parse_args()

    model_path = resolve_model_path(f"tiny:llama:{args.size}", REPO / "artifacts" / "models")
    rows = [json.loads(line) for line in open(args.data) if line.strip()][: args.num_prompts]
    prompts = [r["prompt"] for r in rows]
    n_tokens = len(prompts) * args.max_new_tokens

    # A: the engine alone, same grouping budgets as the job.
    torch.set_num_threads(args.threads)
    model, tok = load_model(model_path, dtype="float32", device="cpu")
    engine = Engine(model, tok, EngineConfig(max_group_prompts=args.max_group_prompts, max_group_tokens=args.max_group_tokens))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    engine_s = time.perf_counter() - t0
    assert sum(r.num_generated_tokens for r in results) == n_tokens
    del model, engine

    # B: the whole job on a private local Ray, one CPU actor.
    import ray
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            summary = job.main([f"model.path={model_path}", f"input.path={src}", f"output.path={tmp}/out",
                                f"sampling.max_new_tokens={args.max_new_tokens}", "sampling.ignore_eos=true",
                                f"packing.max_group_tokens={args.max_group_tokens}", f"packing.max_group_prompts={args.max_group_prompts}",
                                "actors.concurrency=1", f"actors.torch_threads={args.threads}"])
        finally:
            ray.shutdown()
    assert summary["tokens_out"] == n_tokens, summary["tokens_out"]

    engine_tps, job_tps = n_tokens / engine_s, n_tokens / summary["wall_s"]
    print(f"\nmodel: tiny llama ({args.size}), {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
          f"{args.threads} torch thread(s), CPU")
    print(f"engine direct : {engine_s:8.2f} s  {engine_tps:9.1f} generated tokens/s")
    print(f"ray job       : {summary['wall_s']:8.2f} s  {job_tps:9.1f} generated tokens/s "
          f"(pack efficiency {summary['mean_pack_efficiency']})")
    print(f"job / engine  : {job_tps / engine_tps:.1%}")


if __name__ == "__main__":
    main()
