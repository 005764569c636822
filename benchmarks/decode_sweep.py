"""max_num_seqs sweep of the block decode on a varied workload (prepack only): docs/decode.md.

    PYTHONPATH=$PWD python benchmarks/decode_sweep.py --data ../shared/data --model artifacts/llama-small \
        --n 64 --max-num-seqs 16,32,64,128

fp32, one thread, greedy, EOS ignored, max_new_tokens drawn per prompt from 8..256 (seed 0)
or `--new-tokens N` for all.
Reports CPU seconds (robust on a shared machine) and wall seconds of Engine.generate, and
the left-padded static groups (block_decode=False) as the reference.
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from prepack_actor import Engine, EngineConfig, SamplingParams, load_model, scheduler
from prepack_actor.core import block_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", default="alpaca")
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-num-seqs", default="16,32,64,128")
    ap.add_argument("--admit-fractions", default="", help="also sweep scheduler.ADMIT_FRACTION, e.g. 1,2,4,8")
    ap.add_argument("--no-leftpad", action="store_true", help="skip the left-padded reference")
    ap.add_argument("--new-tokens", type=int, default=0, help="every prompt this many tokens (0: drawn 8..256)")
    ap.add_argument("--kernels", default="", help="also the CPU decode kernels, alternating, e.g. fused,loop,fused,loop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    lines = (Path(args.data) / f"{args.dataset}.jsonl").read_text().splitlines()[: args.n]
    ids = [tok(json.loads(x)["prompt"])["input_ids"] for x in lines]
    rng = random.Random(0)
    params = [SamplingParams(max_new_tokens=args.new_tokens or rng.randint(8, 256), ignore_eos=True) for _ in ids]
    out = sum(p.max_new_tokens for p in params)
    configs = [(f"max_num_seqs={m}", EngineConfig(max_num_seqs=int(m)), None) for m in args.max_num_seqs.split(",")]
    m = int(args.max_num_seqs.split(",")[-1])
    configs += [(f"max_num_seqs={m}, admit at 1/{f} free", EngineConfig(max_num_seqs=m), int(f))
                for f in args.admit_fractions.split(",") if f]
    configs += [(f"max_num_seqs={m}, kernel {k}", EngineConfig(max_num_seqs=m), k) for k in args.kernels.split(",") if k]
    if not args.no_leftpad:
        configs.append(("left-padded groups", EngineConfig(block_decode=False), None))
    Engine(model, tok).generate(ids[:2], SamplingParams(max_new_tokens=2))  # warm-up
    default_fraction, default_kernel = scheduler.ADMIT_FRACTION, block_cache.KERNEL
    for name, cfg, knob in configs:
        scheduler.ADMIT_FRACTION = knob if isinstance(knob, int) else default_fraction
        block_cache.KERNEL = knob if isinstance(knob, str) else default_kernel
        engine = Engine(model, tok, cfg)
        t, c = time.perf_counter(), time.process_time()
        engine.generate(ids, params)
        t, c = time.perf_counter() - t, time.process_time() - c
        print(f"{name:20s}: {c:6.1f} CPU s ({out / c:4.0f} tok/CPU s), {t:6.1f} wall s, "
              f"keys read / real {engine.keys_read / max(1, engine.keys_real):.3f}", flush=True)


if __name__ == "__main__":
    main()
