"""Generate completions for every row under input.path with a pool of prepacking actors.

    python jobs/generate.py                                  # bundled sample, tiny llama, local Ray
    python jobs/generate.py --config conf/my.yaml input.path=s3://bucket/prompts/ sampling.max_new_tokens=64
    ray job submit --working-dir . -- python jobs/generate.py input.path=... output.path=...

Config -> read (parse, bad rows -> error rows) -> tokenize -> length-aware groups -> actor
pool (pack, prefill, decode) -> write -> summary.json. Keys: conf/generate.yaml.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from prepack_actor.job import pipeline  # noqa: E402
from prepack_actor.job.config import GenerateConfig, config_or_exit  # noqa: E402

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "conf" / "generate.yaml"


def main(argv: list[str]) -> dict:
    return pipeline.main(config_or_exit(GenerateConfig, argv, DEFAULT_YAML))


if __name__ == "__main__":
    main(sys.argv[1:])
