"""Score every multiple-choice row under input.path by log-likelihood with prepacking actors.

    python jobs/score.py                                     # bundled 40 MMLU items, tiny llama, local Ray
    python jobs/score.py input.path=/data/mmlu.jsonl scoring.mode=simple output.format=jsonl
    ray job submit --working-dir . -- python jobs/score.py input.path=... output.path=...

Rows: {id, prompt, choices: [str, ...], answer?: int} items, or lm-eval-style requests
{id, request_type: "loglikelihood", prompt (the context), continuation}. Out: per row
choice_logprobs, choice_num_tokens, pred, pred_norm, correct (null without answer), for
requests loglikelihood and is_greedy, timing and packing columns, error. The same pipeline as jobs/generate.py with the scoring task. Keys: conf/score.yaml.
"""
import sys
from pathlib import Path

from prepack_actor.job.config import ScoreJobConfig
from prepack_actor.job.cli import cli


def main(argv: list[str]) -> dict:
    return cli(ScoreJobConfig, argv, Path(__file__).resolve().parent.parent / "conf" / "score.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
