"""The generation job under real faults, on a private local Ray (loopback only).

Every job test compares against one clean run, row for row: the content columns of each
id (text, finish reason, token counts, error kind), and that no id appears twice. The
clean run samples (temperature > 0, per-row seeds), so equality also proves that outputs
do not depend on how rows were grouped, packed, split or retried.
"""
import http.client
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from prepack_actor.job.storage import read_output
from prepack_actor.job.oom import is_oom, run_splitting
from prepack_actor.job.output import done_ids

from job_helpers import PROMPTS, env, kill_driver_mid_job, load_job

pytestmark = pytest.mark.slow

NUM_ROWS = 16
COMMON = ["sampling.max_new_tokens=4", "sampling.temperature=0.8", "sampling.top_k=20", "sampling.seed=3",
          "actors.concurrency=1"]
CONTENT = ("generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens", "error_kind")


def write_prompts(path: Path) -> Path:
    lines = [json.dumps({"id": f"q{i}", "prompt": f"{i}: " + PROMPTS[i % 4] * (1 + i % 3), "n": i})
             for i in range(NUM_ROWS)]
    path.write_text("\n".join(lines + ['{"id": "bad", "prompt": '[:-1]]) + "\n")  # + one invalid_json row
    return path


def content(out: str, fmt: str = "parquet") -> dict:
    """id -> content columns; fails on a duplicated id."""
    table = pa.concat_tables(list(read_output(out, fmt)), promote_options="permissive")
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: tuple(r[c] for c in CONTENT) for r in rows}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("rel") / "prompts.jsonl")


@pytest.fixture(scope="module")
def clean(src, moto_s3, tiny_model_dir, ray_local, tmp_path_factory):
    """The reference: a clean run (groups of <= 64 tokens, <= 4 rows). moto_s3 comes before
    ray_local so that the Ray workers inherit its AWS_* variables."""
    out = tmp_path_factory.mktemp("clean") / "out"
    load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                               "packing.max_group_tokens=64", "packing.max_group_prompts=4", *COMMON])
    rows = content(str(out))
    assert len(rows) == NUM_ROWS + 1 and rows[f"prompts.jsonl:{NUM_ROWS + 1}"][-1] == "invalid_json"
    assert sum(r[-1] is None for r in rows.values()) == NUM_ROWS
    return rows


def run_job(*args):
    return load_job("generate").main(list(args))


# ---- actor failure ------------------------------------------------------------------
def test_actor_killed_mid_job_is_restarted_and_rows_written_once(clean, src, tiny_model_dir, tmp_path):
    """The actor os._exit(1)s when starting its 3rd group (with another queued): Ray restarts
    it, redoes the lost groups; same rows as the clean run (other grouping: max_group_prompts=2)."""
    marker, out = tmp_path / "crashed", tmp_path / "out"
    with env(PREPACK_FAULT_EXIT_AFTER_GROUPS=2, PREPACK_FAULT_MARKER=marker):
        summary = run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                          "packing.max_group_prompts=2", *COMMON)
    assert marker.exists(), "the injected crash did not happen"
    assert content(str(out)) == clean
    assert summary["rows_out"] == summary["rows_in"] == NUM_ROWS + 1 and summary["rows_reused"] == 0


# ---- out of memory --------------------------------------------------------------------
def test_injected_oom_is_split_not_fatal(clean, src, tiny_model_dir, tmp_path):
    """Every (sub)group above 120 tokens (longest prompt: 98) raises torch.OutOfMemoryError: the
    one group of all rows is halved down to what fits; no error rows, same rows as clean."""
    out = tmp_path / "out"
    with env(PREPACK_FAULT_OOM_ABOVE_TOKENS=120):
        summary = run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                          "packing.max_group_tokens=4096", "packing.max_group_prompts=64", *COMMON)
    assert content(str(out)) == clean
    assert summary["errors_by_kind"] == {"invalid_json": 1}


def test_run_splitting_halves_down_to_single_prompts():
    calls = []

    def generate(ids):
        calls.append(len(ids))
        if sum(map(len, ids)) > 5:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
        return [f"r{x[0]}" for x in ids]

    ids = [[0] * 3, [1] * 2, [2] * 2, [3] * 9]  # the last one never fits
    out = run_splitting(generate, ids)
    assert out[:3] == ["r0", "r1", "r2"] and is_oom(out[3])
    assert calls[0] == 4 and max(calls[1:]) == 2  # halved, not retried whole
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory")) and not is_oom(ValueError("x"))
    # Any other failure is isolated the same way: only the prompt that fails alone carries it.
    out = run_splitting(lambda part: [1 / (len(x) - 3) for x in part], [[1, 2], [1, 2, 3], [4]])
    assert out[0] == -1.0 and isinstance(out[1], ZeroDivisionError) and out[2] == -0.5


# ---- driver killed, then resume -------------------------------------------------------


def test_driver_killed_then_resume_redoes_only_the_rest(clean, src, tiny_model_dir, tmp_path):
    out, temp = tmp_path / "out", Path("/tmp") / f"rk{os.getpid()}"
    args = [f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
            "packing.max_group_prompts=1", "output.rows_per_file=2", *COMMON]  # files committed as it runs
    kill_driver_mid_job("generate", args, out, temp)
    done = done_ids(str(out), "parquet")  # committed or staged
    assert 2 <= len(done) < NUM_ROWS + 1 and not (out / "_summary.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}

    summary = run_job(*args, "output.mode=resume")
    assert content(str(out)) == clean
    assert summary["rows_reused"] == len(done) and summary["rows_out"] == NUM_ROWS + 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name in before} == before  # untouched
    assert json.loads((out / "_summary.json").read_text())["rows_reused"] == len(done)

    files = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = run_job(*args, "output.mode=resume")  # a finished job: nothing new to run
    assert (again["rows_new"], again["rows_reused"], again["rows_out"]) == (0, NUM_ROWS + 1, NUM_ROWS + 1)
    assert content(str(out)) == clean
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == files  # nothing rewritten


# ---- output.mode ----------------------------------------------------------------------
def test_output_modes_fail_fast(src, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.parquet").write_bytes(b"x")
    for mode, expect in (("error_if_exists", "is not empty"), ("resume", "was not written by this job")):
        with pytest.raises(SystemExit) as e:
            run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", f"output.path={out}",
                    f"output.mode={mode}")
        err = capsys.readouterr().err
        assert e.value.code == 1 and str(out) in err and expect in err, err
    assert (out / "other.parquet").read_bytes() == b"x"  # nothing touched


# ---- object storage -------------------------------------------------------------------
class FlakyProxy(ThreadingHTTPServer):
    """Forwards to moto; answers every k-th request with 503 SlowDown (no forwarding)."""
    daemon_threads = True

    def __init__(self, target: str, every: int):
        self.target, self.every, self.count, self.failed = target, every, 0, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self):
        body, srv = self._body(), self.server
        with srv.lock:
            srv.count += 1
            fail = srv.count % srv.every == 0
            srv.failed += fail
        if fail:
            err = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(srv.target, timeout=30)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(resp.getheader("Content-Length") if self.command == "HEAD"
                                               else len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_s3_transient_503s_are_retried(clean, src, moto_s3, tiny_model_dir):
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    fs.mkdir("flaky")
    fs.put(str(src), "flaky/in/prompts.jsonl")
    proxy = FlakyProxy(moto_s3.split("//")[1], every=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        summary = run_job(f"model.path={tiny_model_dir('llama')}", "input.path=s3://flaky/in/",
                          "output.path=s3://flaky/out/", f"storage.endpoint_url=http://127.0.0.1:{proxy.server_port}",
                          "storage.max_attempts=8", "storage.retry_mode=standard", *COMMON)
    finally:
        proxy.shutdown()
    assert proxy.failed >= 3, proxy.failed  # faults really happened, at reads, writes and the summary
    assert content("s3://flaky/out/") == clean
    assert json.loads(fs.cat("flaky/out/_summary.json"))["rows_out"] == summary["rows_out"] == NUM_ROWS + 1


def test_s3_missing_bucket_fails_fast(src, moto_s3, tiny_model_dir, capsys):
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run_job(f"model.path={tiny_model_dir('llama')}", f"input.path={src}", "output.path=s3://no-such-bucket/out/", "output.mode=error_if_exists")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert "s3://no-such-bucket/out/" in err and "bucket" in err.lower(), err
    assert time.time() - t0 < 30


def test_token_budget_from_memory_budget(tiny_model_dir):
    from transformers import AutoConfig

    from prepack_actor.job.oom import bytes_per_token, token_budget_for_memory
    c = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    kv, act = bytes_per_token(c, 4)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert kv == 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4
    budget = token_budget_for_memory(c, 0.01, 4, max_group_prompts=8, max_new_tokens=16)
    assert budget == int((0.01 * 1024 ** 3 - 8 * 16 * kv) // (2 * kv + act)) > 0
    assert token_budget_for_memory(c, 0.02, 4, 8, 16) > budget  # more memory, bigger groups
    with pytest.raises(ValueError, match="too small"):
        token_budget_for_memory(c, 1e-6, 4, 64, 4096)
