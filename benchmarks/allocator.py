"""glibc's malloc vs tcmalloc (LD_PRELOAD) under the same engine run, alternating processes.

    apt-get install libtcmalloc-minimal4      # Debian's tcmalloc (vLLM's CPU engine asks for it too)
    PYTHONPATH=. python benchmarks/allocator.py --data ../shared/data/mmlu.jsonl --model artifacts/llama-small \
        --n 64 --rounds 3

Each round runs a fresh process per allocator (the allocator is fixed at process start): load
the model, warm up, then prefill the n prompts and generate --new-tokens greedy tokens from
them, timed in CPU seconds (one thread), with the minor page faults of the timed part.
Prints medians per allocator and the ratio (> 1: tcmalloc faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TCMALLOC = "libtcmalloc_minimal.so.4"


def worker(data: str, model_dir: str, n: int, new_tokens: int) -> None:
    """In the child: one timed run, one JSON line on stdout."""
    import resource
    import time

    import torch

    from prepack_actor import Engine, SamplingParams, load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok)
    prompts = [json.loads(line)["prompt"] for line in open(data)][:n]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts[:4], params)  # warm-up, untimed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.process_time()
    engine.prefill(prompts)
    prefill = time.process_time() - t
    t = time.process_time()
    engine.generate(prompts, params)
    e2e = time.process_time() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"prefill_s": prefill, "e2e_s": e2e, "faults": faults,
                      "tcmalloc": TCMALLOC in os.environ.get("LD_PRELOAD", "")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a JSONL file with a 'prompt' field")
    ap.add_argument("--model", required=True, help="checkpoint dir (python -m prepack_actor.tiny --size small ...)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"glibc": [], "tcmalloc": []}
    for r in range(args.rounds):
        for name in runs:
            env = dict(os.environ, LD_PRELOAD=TCMALLOC) if name == "tcmalloc" else os.environ
            out = subprocess.run([sys.executable, __file__, "--worker", args.data, args.model, str(args.n),
                                  str(args.new_tokens)], env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            if name == "tcmalloc" and not run["tcmalloc"]:
                sys.exit(f"{TCMALLOC} did not load (apt-get install libtcmalloc-minimal4)")
            runs[name].append(run)
            print(f"round {r} {name}: prefill {run['prefill_s']:.2f} s, end to end {run['e2e_s']:.2f} s, "
                  f"page faults {run['faults']}", flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("prefill_s", "e2e_s", "faults")}
           for name, rs in runs.items()}
    print("\n| allocator | prefill CPU s | end to end CPU s | page faults |\n|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['prefill_s']:.2f} | {m['e2e_s']:.2f} | {m['faults']:.0f} |")
    g, t = med["glibc"], med["tcmalloc"]
    print(f"\ntcmalloc vs glibc (medians of {args.rounds}): prefill {g['prefill_s'] / t['prefill_s']:.2f}x, "
          f"end to end {g['e2e_s'] / t['e2e_s']:.2f}x, page faults / {g['faults'] / t['faults']:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
