"""Generate completions for every row under input.path with a pool of prepacking actors.

    python jobs/generate.py                                  # bundled sample, tiny llama, local Ray
    python jobs/generate.py --config conf/my.yaml input.path=s3://bucket/prompts/ sampling.max_new_tokens=64
    ray job submit --working-dir . -- python jobs/generate.py input.path=... output.path=...

Config -> read (parse, bad rows -> error rows) -> tokenize -> length-aware groups -> actor
pool (pack, prefill, decode) -> write -> _summary.json. Keys: conf/generate.yaml.
"""
import sys
from pathlib import Path

from prepack_actor.job.config import GenerateConfig
from prepack_actor.job.cli import cli


def main(argv: list[str]) -> dict:
    return cli(GenerateConfig, argv, Path(__file__).resolve().parent.parent / "conf" / "generate.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
