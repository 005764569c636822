"""Log-likelihood scoring throughput: prepacked (shared, simple) vs padded per-pair batches.

    python benchmarks/score_bench.py --data ../shared/data --items 2000 --size small --repeats 3

Every method scores the same (prompt, choice) pairs with the same harness tokenization
(inputs.encode_items) on the same model; pairs/s is total pairs / wall time of the
whole pass (tokenization excluded, packing and mask building included), median over
repeats. Baselines: each pair its own row, left-padded batches of --batch-size pairs
(`packing.pad_left`, positions from the mask as generate does), in input order (full
batching) and sorted by length (length-ordered batching); logits only for the last
positions that hold continuation tokens. The script checks that every method gives the
same log-likelihoods before it prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prepack_actor.core.packing import pad_left
from prepack_actor.models import load_model
from prepack_actor.scoring import ScoreConfig, Scorer
from prepack_actor.tiny import build_tiny_model


@torch.inference_mode()
def padded_scores(model, pairs: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                  order: list[int]) -> list[float]:
    """Sum of continuation log-probs per pair, batches of left-padded whole pairs."""
    out = [0.0] * len(pairs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_left([pairs[i][0] for i in idx], pad_id)  # [B, L]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(pairs[i][0]) - pairs[i][1] for i in idx) + 1  # continuation + the token before
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                       logits_to_keep=keep).logits.float()  # [B, keep, V]
        logp = torch.log_softmax(logits[:, :-1], -1)  # predicts the last keep-1 tokens
        targets = ids[:, -(keep - 1):]  # [B, keep-1]
        lp = logp.gather(-1, targets[..., None])[..., 0]  # [B, keep-1]
        for b, i in enumerate(idx):
            n = len(pairs[i][0]) - pairs[i][1]
            out[i] = float(lp[b, -n:].sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True,
                    help="folder with mmlu_scoring.jsonl, mmlu.jsonl, alpaca.jsonl (e.g. ../shared/data)")
    ap.add_argument("--items", type=int, default=2000, help="MMLU items scored (first N of mmlu_scoring.jsonl)")
    ap.add_argument("--size", choices=("tiny", "small"), default="small", help="tiny-model size (prepack_actor.tiny)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per padded baseline batch")
    ap.add_argument("--max-group-tokens", type=int, default=8192, help="tokens per prepacked forward pass")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    items = [json.loads(line) for line in open(args.data / "mmlu_scoring.jsonl")][:args.items]
    texts = [json.loads(line)["prompt"] for f in ("mmlu.jsonl", "alpaca.jsonl") for line in open(args.data / f)]
    with tempfile.TemporaryDirectory() as d:
        build_tiny_model(args.arch, d, size=args.size, texts=texts)  # realistic token counts
        model, tok = load_model(d, dtype="float32", device="cpu")
    pad_id = tok.pad_token_id

    scorers = {m: Scorer(model, tok, ScoreConfig(mode=m, max_group_tokens=args.max_group_tokens))
               for m in ("shared", "simple")}
    prepared = [scorers["shared"].prepare(it) for it in items]
    pairs = [(enc.context + c, len(enc.context)) for _, enc in prepared for c in enc.continuations]
    n_pairs = len(pairs)
    by_len = sorted(range(n_pairs), key=lambda i: len(pairs[i][0]))
    methods = {
        "prepacked shared": lambda: [lp for r in scorers["shared"].score_prepared(prepared) for lp in r.choice_logprobs],
        "prepacked simple": lambda: [lp for r in scorers["simple"].score_prepared(prepared) for lp in r.choice_logprobs],
        "padded per-pair": lambda: padded_scores(model, pairs, args.batch_size, pad_id, list(range(n_pairs))),
        "padded, length-sorted": lambda: padded_scores(model, pairs, args.batch_size, pad_id, by_len),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    scores: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so machine load drifts hit every method alike
        for name, fn in methods.items():
            t0 = time.perf_counter()
            scores[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    ref = scores["padded per-pair"]
    for name, got in scores.items():
        diff = max(abs(a - b) for a, b in zip(got, ref))
        assert diff < 1e-3, f"{name} disagrees with the padded baseline by {diff}"

    tokens_pair = sum(len(p) for p, _ in pairs)
    tokens_shared = sum(enc.num_tokens(True) for _, enc in prepared)
    print(f"{args.items} MMLU items, {n_pairs} pairs, {args.arch}-{args.size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), fp32 CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"tokens: per-pair {tokens_pair}, shared layout {tokens_shared} "
          f"({tokens_pair / tokens_shared:.2f}x fewer); padded batch {args.batch_size} pairs; "
          f"prepack budget {args.max_group_tokens} tokens")
    base = statistics.median(times["padded per-pair"])
    print(f"{'method':<24}{'median s':>10}{'pairs/s':>10}{'vs padded':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>10.2f}{n_pairs / med:>10.1f}{base / med:>10.2f}x")


if __name__ == "__main__":
    main()
