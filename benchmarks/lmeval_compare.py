"""Eval scoring side by side: lm-eval's HFLM vs prepack (library, lm-eval backend, job), pairs/s.

    python benchmarks/lmeval_compare.py --data ../shared/data --items 2000 --size tiny --repeats 3 [--job]

The same MMLU items (first --items of mmlu_scoring.jsonl, 4 one-token choices each) on the
same checkpoint (a random-weight Llama of --size with a BPE trained on the prompts), fp32
CPU, one torch thread. Methods, interleaved per repeat (bench.measure.interleaved: the order
rotates each round, so machine load drifts hit all alike):
- `hflm bs=B`: lm-eval 0.4.13's `HFLM.loglikelihood` with its defaults (logits_cache=True:
  one forward per context for one-token continuations), for each --hf-batch-sizes; the
  best of them is the baseline;
- `prepack library`: `Scorer.score(items)` (tokenization included, as in HFLM's call);
- `prepack lm-eval backend`: `PrepackLM.loglikelihood` on the same lm-eval Instances;
- `prepack job` (--job): `jobs/score.py` on a local Ray, one actor, the items as a JSONL
  file: wall time from the call to the summary, with the summary's fixed cost and steady
  throughput (`fixed_s`, `steady_pairs_per_s`).
Every method's log-likelihoods are checked equal (1e-4) to HFLM's before the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from prepack_actor.bench.measure import interleaved
from prepack_actor.lmeval import PrepackLM
from prepack_actor.models import load_model
from prepack_actor.scoring import ScoreConfig, Scorer
from prepack_actor.tiny import build_tiny_model


def run_job(model_dir: str, items_file: Path, out: Path, group_tokens: int) -> tuple[float, dict]:
    from prepack_actor.job.cli import cli
    from prepack_actor.job.config import ScoreJobConfig
    conf = Path(__file__).resolve().parent.parent / "conf" / "score.yaml"
    t0 = time.perf_counter()
    summary = cli(ScoreJobConfig, [f"model.path={model_dir}", f"input.path={items_file}", f"output.path={out}",
                                   "output.mode=overwrite", "output.format=jsonl", "model.dtype=float32",
                                   "actors.torch_threads=1", f"packing.max_group_tokens={group_tokens}"], conf)
    return time.perf_counter() - t0, summary


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lmeval-compare-"))
    try:
        compare(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(tmp: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with mmlu_scoring.jsonl (e.g. ../shared/data)")
    ap.add_argument("--items", type=int, default=2000, help="first N items of mmlu_scoring.jsonl")
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny", help="tiny: 2 layers; small: 70M Llama")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="rounds run first and not counted")
    ap.add_argument("--hf-batch-sizes", default="8,16,64", help="HFLM batch sizes tried (the best is the baseline)")
    ap.add_argument("--max-group-tokens", type=int, default=8192, help="prepack tokens per forward pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--job", action="store_true", help="also run the Ray job (adds Ray start-up per repeat)")
    ap.add_argument("--compile", action="store_true",
                    help="also the library with compiled decoder layers (ScoreConfig.compile, compiled before timing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    items = [json.loads(line) for line in open(args.data / "mmlu_scoring.jsonl")][:args.items]
    texts = [json.loads(line)["prompt"] for f in ("mmlu.jsonl", "alpaca.jsonl") for line in open(args.data / f)]
    model_dir = str(build_tiny_model("llama", tmp / "model", size=args.size, texts=texts))
    hf_model, hf_tok = load_model(model_dir, dtype="float32", device="cpu")
    model, tok = load_model(model_dir, dtype="float32", device="cpu")  # a copy: prepack switches it to varlen
    instances = [Instance("loglikelihood", {}, (it["prompt"], c), 0) for it in items for c in it["choices"]]
    n_pairs = len(instances)
    items_file = tmp / "items.jsonl"
    items_file.write_text("".join(json.dumps(it) + "\n" for it in items))

    scorer = Scorer(model, tok, ScoreConfig(max_group_tokens=args.max_group_tokens))
    backend = PrepackLM(pretrained=model, tokenizer=tok, max_group_tokens=args.max_group_tokens)
    methods = {f"hflm bs={b}": (lambda b=b: [ll for ll, _ in HFLM(
        pretrained=hf_model, tokenizer=hf_tok, batch_size=b).loglikelihood(instances, disable_tqdm=True)])
        for b in map(int, args.hf_batch_sizes.split(","))}
    methods["prepack library"] = lambda: [lp for r in scorer.score(items) for lp in r.choice_logprobs]
    methods["prepack lm-eval backend"] = lambda: [ll for ll, _ in backend.loglikelihood(instances)]
    if args.compile:
        compiled = Scorer(model, tok, ScoreConfig(max_group_tokens=args.max_group_tokens, compile=True))
        compiled.warm_up()
        methods["prepack library, compiled"] = lambda: [lp for r in compiled.score(items) for lp in r.choice_logprobs]
    summaries: list[dict] = []
    if args.job:
        def job():
            wall, summary = run_job(model_dir, items_file, tmp / "out", args.max_group_tokens)
            summaries.append(summary)
            rows = [json.loads(line) for f in sorted((tmp / "out").glob("part-*.jsonl")) for line in open(f)]
            by_id = {r["id"]: r["choice_logprobs"] for r in rows}
            return [lp for it in items for lp in by_id[it["id"]]]
        methods["prepack job"] = job

    scores: dict[str, list[float]] = {}

    def runner(name):
        def run(warm: bool) -> dict:
            t0 = time.perf_counter()
            scores[name] = methods[name]()
            return {"s": time.perf_counter() - t0}
        return run

    rounds = interleaved({m: runner(m) for m in methods}, args.repeats, args.warmup, log=print)
    times = {m: [r["s"] for r in rs] for m, rs in rounds.items()}
    hf_names = [m for m in methods if m.startswith("hflm")]
    ref = scores[hf_names[0]]
    for name, got in scores.items():
        diff = max(abs(a - b) for a, b in zip(got, ref))
        assert len(got) == len(ref) and diff < 1e-4, f"{name} disagrees with HFLM by {diff}"

    med = {m: statistics.median(ts) for m, ts in times.items()}
    best = min(hf_names, key=med.__getitem__)
    print(f"\n{args.items} MMLU items, {n_pairs} pairs, llama-{args.size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), fp32 CPU, {args.threads} thread(s), "
          f"median of {args.repeats}; baseline: {best}")
    print(f"| method | median s | pairs/s | vs {best} |\n| --- | ---: | ---: | ---: |")
    for name in methods:
        print(f"| {name} | {med[name]:.2f} | {n_pairs / med[name]:.1f} | {med[best] / med[name]:.2f}x |")
    if summaries:
        s = summaries[-1]
        print(f"job (last run): fixed_s {s['fixed_s']} (start_s {s['start_s']}, load_s {s['load_s']}), "
              f"busy_s {s['busy_s']}, steady {s['steady_pairs_per_s']} pairs/s "
              f"({s['steady_pairs_per_s'] * med['prepack library'] / n_pairs:.2f}x the library)")


if __name__ == "__main__":
    main()
