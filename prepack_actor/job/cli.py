"""The jobs' command line: --help and config errors before any heavy import.

    python jobs/generate.py --help            # every key, default and meaning; exit 0, < 1 s
    python jobs/generate.py --dry-run ...     # preflight + the first rows prepared and printed
    python jobs/generate.py key=value ...     # a config error: one line, exit 2; a job error: exit 1
"""
from __future__ import annotations

import sys
from pathlib import Path

from .config_file import config_or_exit


def cli(schema: type, argv: list[str], default_yaml: str | Path) -> dict | None:
    argv = list(argv)
    dry_run = "--dry-run" in argv
    cfg = config_or_exit(schema, [a for a in argv if a != "--dry-run"], default_yaml)
    from .pipeline import JobError, run  # torch and ray load only for a valid config

    try:
        return run(cfg, dry_run=dry_run)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
