"""Stop-string checks per decode step: decoding each sequence whole (the old check) against
outputs.StopText (incremental), for 128 running sequences of N generated tokens.

    PYTHONPATH=. python benchmarks/stop_strings.py --model artifacts/llama-small --data ../shared/data/alpaca.jsonl

The sequences are real text (the prompts tokenized end to end, 128 different offsets) and
the stop strings never match, so every check runs to the end; one thread, wall clock,
both measured one after the other at each length.
"""
import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from prepack_actor.core.sampling import SamplingParams
from prepack_actor.outputs import StopChecker, StopText


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint dir (its tokenizer is used)")
    ap.add_argument("--data", required=True, help="a prompts JSONL file (field 'prompt')")
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--seqs", type=int, default=128)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    lines = Path(args.data).read_text().splitlines()
    ids = tok(" ".join(json.loads(x)["prompt"] for x in lines), add_special_tokens=False)["input_ids"]
    stops = StopChecker(tok, set())
    params = SamplingParams(max_new_tokens=10**6, stop=["\x00never", "@@@"])
    for n in map(int, args.lengths.split(",")):
        seqs = [ids[i * 37: i * 37 + n] for i in range(args.seqs)]
        assert all(len(s) == n for s in seqs), "not enough text for this length"
        t = time.perf_counter()
        for s in seqs[:8]:  # 8 sequences suffice for the whole decode: it is the slow one
            for k in range(1, n + 1):
                tok.decode(s[:k], skip_special_tokens=True)
        whole = (time.perf_counter() - t) / 8 * args.seqs / n
        t = time.perf_counter()
        for s in seqs:
            text, tokens = StopText(), []
            for x in s:
                tokens.append(x)
                assert not stops.check(tokens, params, text)[0]
        incremental = (time.perf_counter() - t) / n
        print(f"{n:5d} tokens: whole decode {whole * 1e3:6.2f} ms/step, incremental {incremental * 1e3:5.2f} "
              f"ms/step ({args.seqs} sequences), {whole / incremental:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
