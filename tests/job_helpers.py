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


def kill_driver_mid_job(job: str, args: list[str], out: Path, temp: Path) -> None:
    """Run `job` in a driver subprocess on a private Ray (temp dir `temp`), slowed down per group;
    SIGKILL the driver and its Ray once two data files exist under `out`."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import _stop_cluster
    proc = subprocess.Popen([sys.executable, "-c", driver_script(job), str(temp), *args], cwd=REPO,
                            start_new_session=True, env=dict(os.environ, PREPACK_FAULT_DELAY_S="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("part-*"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        # Every process the driver started (its Ray: GCS, raylet, the actors' workers, which
        # rename themselves and may leave the process group), taken before the kill: an actor
        # outliving its driver for a moment could stage one more group after the test counted.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its private Ray, nothing else
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(tree, timeout=30)
        proc.wait(timeout=30)
    finally:
        _stop_cluster(temp)


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


# ---- poison rows (docs/failure.md "Every row is data") ----------------------------------
LONG_PROMPT = "Tell me everything about " + "the sea and the sky " * 10  # the longest prompt by far
BIG_DOC = "d" * (1 << 20)  # a 1 MB carried value: its JSONL output line is longer than pyarrow's default block


def poison_shards(root: Path) -> dict:
    """Two JSONL shards mixing good rows with every poison; returns the paths and, per final
    id, the expected error_kind (None = generated)."""
    d = root / "poison"
    d.mkdir(parents=True)
    P = PROMPTS
    a = [json.dumps({"id": "g0", "prompt": P[0], "meta": 1, "tags": ["a"], "nested": {"k": {"j": [1, 2]}}}),
         json.dumps({"id": "g1", "prompt": P[1], "meta": "one", "tags": [], "empty": {}, "big": 2 ** 70}),
         '{"id": "g2", "prompt": "smile \\ud83d\\ude00 please", "score": NaN}',  # a valid surrogate pair; NaN
         '{"id": "surr", "prompt": "bad \\ud800 text"}',  # valid JSON, not valid Unicode
         '{"id": "surr-carry", "prompt": "fine", "note": "x\\udfff"}',
         json.dumps({"id": "mnt-str", "prompt": "p", "max_new_tokens": "5"}),
         json.dumps({"id": "mnt-big", "prompt": "p", "max_new_tokens": 2 ** 31}),
         json.dumps({"id": "mnt-float", "prompt": "p", "max_new_tokens": 3.0}),
         json.dumps({"id": "seed-big", "prompt": "p", "seed": 2 ** 63}),
         json.dumps({"id": "seed-neg", "prompt": "p", "seed": -1}),
         json.dumps({"id": "seed-max", "prompt": P[2], "seed": 2 ** 63 - 1}),
         json.dumps({"id": "msg-str", "messages": "hello"}),
         json.dumps({"id": "../../x", "prompt": P[3]}),
         json.dumps({"id": "a/b", "prompt": P[0]}),
         json.dumps({"id": "L" * 10000, "prompt": P[1]}),
         json.dumps({"id": "", "prompt": P[2]}),
         json.dumps({"id": 1, "prompt": P[3]}),
         json.dumps({"id": "1", "prompt": P[0]}),  # collides with the number 1 above
         json.dumps({"id": "dup", "prompt": P[1]}),
         json.dumps({"id": "dup", "prompt": P[2]}),
         json.dumps({"id": "x#1", "prompt": P[3]}),
         json.dumps({"id": "x", "prompt": P[0]}),
         json.dumps({"id": "x", "prompt": P[1]}),  # its suffix skips x#1, an input id
         json.dumps({"id": "deep", "prompt": "p", "d": json.loads("[" * 150 + "]" * 150)}),
         '{"id": "deeper", "d": ' + "[" * 5000 + "]" * 5000 + "}",  # past Python's recursion limit
         '{"id": "digits", "prompt": "p", "n": 1' + "0" * 5000 + "}",  # an int too long to convert
         json.dumps({"id": 2.5, "prompt": P[2]}),
         json.dumps({"id": {"k": 1}, "prompt": P[3]}),
         json.dumps({"prompt": P[0]}),  # derived id poison/a.jsonl:29
         json.dumps({"id": "long", "prompt": LONG_PROMPT}),
         json.dumps({"id": "big-doc", "prompt": P[2], "doc": BIG_DOC})]
    b = [json.dumps({"id": "dup", "prompt": P[3]}),  # a repeat across shards
         json.dumps({"id": "a.jsonl:29", "prompt": P[1]}),  # repeats a derived id
         json.dumps({"id": "g9", "prompt": P[2], "meta": 5, "nested": {"k": {"j": [3]}}, "empty": {"z": 1}}),
         json.dumps({"id": "chat", "messages": MESSAGES})]
    (d / "a.jsonl").write_text("\n".join(a) + "\n")
    (d / "b.jsonl").write_text("\n".join(b) + "\n")
    errors = {"surr": "invalid_unicode", "surr-carry": "invalid_unicode", "mnt-str": "bad_field",
              "mnt-big": "bad_field", "mnt-float": "bad_field", "seed-big": "bad_field", "seed-neg": "bad_field",
              "msg-str": "bad_messages", "1#1": "duplicate_id", "dup#1": "duplicate_id", "x#2": "duplicate_id",
              "deep": "bad_field", "a.jsonl:25": "invalid_json", "a.jsonl:26": "invalid_json",
              "dup#2": "duplicate_id", "a.jsonl:29#1": "duplicate_id"}
    good = ["g0", "g1", "g2", "seed-max", "../../x", "a/b", "L" * 10000, "", "1", "dup", "x#1", "x", "2.5",
            '{"k": 1}', "a.jsonl:29", "long", "big-doc", "g9", "chat"]
    return {"dir": d, "expected": {**{i: None for i in good}, **errors}}
