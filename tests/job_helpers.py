"""Helpers shared by the generation-job tests: input shards with every kind of row."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["Below is an instruction. Write a short poem about the sea.",
           "What is the capital of France?", "Explain",
           "List three prime numbers and say why they are prime, in detail, step by step."]


def load_job(name: str = "generate"):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def env(**values):
    """Set environment variables for the block (fault plans are read from them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def driver_script(job: str) -> str:
    """`python -c` source: a job's driver on a private Ray under temp dir argv[1], job args after."""
    return ("import sys, ray; ray.init(address='local', num_cpus=2, include_dashboard=False, "
            f"_temp_dir=sys.argv[1]); sys.path.insert(0, 'jobs'); import {job}; {job}.main(sys.argv[2:])")


def good_jsonl_lines() -> list[str]:
    """Good rows: ids, a missing id, carried columns, chat messages, per-row overrides."""
    return [json.dumps({"id": "p0", "prompt": PROMPTS[0], "topic": "sea", "meta": {"n": 1}}),
            json.dumps({"prompt": PROMPTS[1], "topic": "geo", "meta": {"n": 2}}),  # derived id
            json.dumps({"id": "chat0", "messages": MESSAGES, "topic": "chat", "meta": {"n": 3}}),
            json.dumps({"id": "p3", "prompt": PROMPTS[3], "max_new_tokens": 3, "topic": "math", "meta": {"n": 4}})]


# line text (bytes) -> expected error_kind; each bad row keeps its position for derived ids
BAD_LINES = [
    (b'{"id": "bad-json", "prompt": "unterminated', "invalid_json"),
    (b'{"id": "no-prompt", "topic": "x"}', "missing_prompt"),
    (b'{"id": "int-prompt", "prompt": 42}', "bad_prompt"),
    (b'{"id": "empty", "prompt": ""}', "empty_prompt"),
    (b'{"id": "utf8", "prompt": "caf\xc3\x28"}', "invalid_utf8"),
    (json.dumps({"id": "too-long", "prompt": "word " * 3000}).encode(), "prompt_too_long"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'{"id": "bad-msgs", "messages": [{"role": "user"}]}', "bad_messages"),
]


def write_inputs(root: Path) -> dict:
    """Two JSONL shards (one mixed with every bad row) and one Parquet shard under root/in."""
    d = root / "in"
    d.mkdir(parents=True)
    good = good_jsonl_lines()
    (d / "a.jsonl").write_text("\n".join(good[:2]) + "\n")
    mixed = [good[2].encode()] + [b for b, _ in BAD_LINES] + [good[3].encode()]
    (d / "b.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    pq.write_table(pa.table({"id": ["pq0", "pq1"], "prompt": [PROMPTS[2], PROMPTS[0] + " Again."],
                             "topic": ["pq", "pq"], "meta": [{"n": 5}, {"n": 6}]}), d / "c.parquet")
    (d / "README.txt").write_text("not a shard")  # ignored in auto format
    return {"dir": d, "num_rows": 2 + len(mixed) + 2,
            "bad": {("b.jsonl:%d" % (i + 2) if k in ("invalid_json", "invalid_utf8", "not_an_object")
                     else json.loads(b)["id"]): k for i, (b, k) in enumerate(BAD_LINES)}}
