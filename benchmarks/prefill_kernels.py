"""Prefill on CPU with and without prepack's C++ kernels: the numbers behind docs/varlen.md
("Fused CPU kernels").

    PYTHONPATH=$PWD python benchmarks/prefill_kernels.py --data ../shared/data --model artifacts/llama-small \
        [--dataset mmlu] [--n 256] [--repeats 3]

Two measurements, one thread, fp32, on the first n prompts of the dataset (their real token
lengths):
1. attention alone, one layer of the 70M Llama's shapes (12 heads, 4 KV heads, head dim 64):
   each CPU prefill kernel of core/attention.py on one packed stream, ms and GFLOP/s of the
   causal work (best of 5, the kernels interleaved);
2. Engine.prefill of all n prompts, CPU s, interleaved repeats, medians: the fused attention
   kernel and C++ RMSNorm/RoPE with the gated MLP in passes of core/linear.MLP_ROWS rows, on
   MKL where core/linear.MKL_MLP (Intel CPUs; the defaults), the same with the passes on
   oneDNN, the same with the MLP over a whole group in one pass (oneDNN), the per-prompt sdpa
   loop with C++ RMSNorm/RoPE, and the loop with torch's RMSNorm/RoPE (the engine before
   these kernels).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def attention_only(lengths: list[int], repeats: int = 5) -> None:
    from prepack_actor.core import attention

    bounds = tuple([0] + torch.cumsum(torch.tensor(lengths), 0).tolist())
    t = bounds[-1]
    qkv = torch.randn(t, 20, 64)  # as a fused projection's output: q, k, v are strided views
    q, k, v = (x.transpose(0, 1) for x in (qkv[:, :12], qkv[:, 12:16], qkv[:, 16:]))  # [H*, T, D]
    flops = sum(n * n for n in lengths) * 12 * 64 * 2  # causal: L^2 / 2 pairs, 2 matmuls, 2 flops a MAC
    best = {k: float("inf") for k in attention.CPU_KERNELS}
    for _ in range(repeats):
        for name in attention.CPU_KERNELS:
            start = time.perf_counter()
            attention.CPU[name](q, k, v, bounds, 0.125, None)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"attention, one layer, {len(lengths)} prompts, {t} tokens:")
    for name, s in best.items():
        print(f"  {name:6s} {s * 1e3:8.1f} ms  {flops / s / 1e9:6.1f} GFLOP/s  ({best['loop'] / s:.2f}x the loop)")


def engine_prefill(model_dir: str, ids: list[list[int]], repeats: int) -> None:
    from prepack_actor import Engine, EngineConfig, load_model
    from prepack_actor.core import attention, elementwise, linear

    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    engine = Engine(model, tok, EngineConfig())
    engine.prefill([x[:8] for x in ids[:4]])  # warm-up (and the kernels' build)
    rows, whole, mkl = linear.MLP_ROWS, 1 << 30, linear.MKL_MLP
    print(f"MLP passes on MKL (core/linear.MKL_MLP): {mkl}")
    configs = {"fused attention + C++ norm/rope": ("fused", True, rows, mkl),
               "the same, MLP passes on oneDNN": ("fused", True, rows, False),
               "the same, MLP in one pass": ("fused", True, whole, False),
               "sdpa loop + C++ norm/rope": ("loop", True, whole, False),
               "sdpa loop + torch norm/rope": ("loop", False, whole, False)}
    times = {c: [] for c in configs}
    logits = {}
    try:
        for _ in range(repeats):
            for name, (kernel, fused, mlp_rows, on_mkl) in configs.items():
                attention.KERNEL, elementwise.ENABLED, linear.MLP_ROWS, linear.MKL_MLP = kernel, fused, mlp_rows, on_mkl
                start = time.process_time()
                logits[name] = engine.prefill(ids)
                times[name].append(time.process_time() - start)
    finally:
        attention.KERNEL, elementwise.ENABLED, linear.MLP_ROWS, linear.MKL_MLP = "fused", True, rows, mkl
    base = statistics.median(times["sdpa loop + torch norm/rope"])
    print(f"Engine.prefill, {len(ids)} prompts, CPU s, medians of {repeats}:")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts):7.2f}  ({base / statistics.median(ts):.3f}x)  runs "
              + " ".join(f"{x:.2f}" for x in ts))
    ref = logits["sdpa loop + torch norm/rope"]
    print("  largest logit difference from the loop + torch:", max((x - ref).abs().max().item() for x in logits.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with <dataset>.jsonl (a 'prompt' field)")
    ap.add_argument("--dataset", default="mmlu")
    ap.add_argument("--model", required=True, help="checkpoint dir (prepack_actor.tiny --size small)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    lines = (Path(args.data) / f"{args.dataset}.jsonl").read_text().splitlines()[: args.n]
    ids = [tok(json.loads(line)["prompt"])["input_ids"] for line in lines]
    attention_only([len(x) for x in ids[:64]])
    engine_prefill(args.model, ids, args.repeats)


if __name__ == "__main__":
    main()
