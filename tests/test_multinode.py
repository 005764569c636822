"""The generation job on a Ray cluster of two nodes on this machine: a head (`ray start
--head`) and a worker (`ray start --address`), each with its own CPUs and temp dir, every
process on this machine (Ray 2.60 advertises the machine's own address, not 127.0.0.1). Actors run on both nodes; the outputs equal a one-node run; a worker node whose raylet
is SIGKILLed mid-job loses and duplicates nothing.

The one-node reference is what a one-node run writes, computed without a second job: the
engine on each prompt alone with the row's seed (derived_seed of sampling.seed and its id),
which the one-node job tests (test_reliability.py, test_generate_job.py) prove equal.
"""
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import ray

from prepack_actor import Engine, SamplingParams, load_model
from prepack_actor.job.rows import derived_seed
from prepack_actor.job.storage import read_output

from conftest import RAY_BIN, _stop_cluster, free_port
from job_helpers import PROMPTS, env, load_job

pytestmark = pytest.mark.slow

NUM_ROWS = 24
SEED, TEMP, TOP_K, MAX_NEW = 5, 0.8, 20, 3
ARGS = [f"sampling.max_new_tokens={MAX_NEW}", f"sampling.temperature={TEMP}", f"sampling.top_k={TOP_K}",
        f"sampling.seed={SEED}", "actors.concurrency=2", "actors.cpus_per_actor=0.5", "actors.torch_threads=1",
        "packing.max_group_prompts=2", "output.rows_per_file=4"]


def _ports(*names):
    return [f"--{n}={free_port()}" for n in names]


class TwoNodes:
    """A head node now, a worker node on demand; only these processes are ever stopped."""

    def __init__(self):
        self.head_tmp = Path("/tmp") / f"mh{os.getpid()}"  # short: socket paths have a length limit
        self.worker_tmp: Path | None = None
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
                        RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
        self.port = free_port()
        self._start("--head", f"--port={self.port}", "--include-dashboard=false",
                    *_ports("ray-client-server-port"), temp=self.head_tmp)
        self.workers = 0

    def _start(self, *args, temp: Path):
        # A free port can be taken by another process before Ray binds it: one retry with fresh
        # node ports; a second failure shows what `ray start` said.
        for attempt in (1, 2):
            cmd = [RAY_BIN, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
                   "--object-store-memory=100000000", "--disable-usage-stats",
                   *_ports("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                           "metrics-export-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port")]
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
            if done.returncode == 0:
                return
            _stop_cluster(temp)
        raise RuntimeError(f"ray start failed twice: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def add_worker(self) -> str:
        """Start a worker node; returns its node id."""
        self.workers += 1
        self.worker_tmp = Path("/tmp") / f"mw{os.getpid()}-{self.workers}"
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self._start(f"--address=127.0.0.1:{self.port}", temp=self.worker_tmp)
        for _ in range(120):
            new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
            if new:
                return new.pop()
            time.sleep(0.5)
        raise RuntimeError("the worker node did not join")

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet (and nothing else); returns its pid."""
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and str(self.worker_tmp) in cmd:
                os.kill(p.info["pid"], signal.SIGKILL)
                return p.info["pid"]
        raise RuntimeError("no raylet of the worker node")

    def stop(self):
        for temp in [self.head_tmp] + [Path("/tmp") / f"mw{os.getpid()}-{i}" for i in range(1, self.workers + 1)]:
            _stop_cluster(temp)
            subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    nodes = TwoNodes()
    try:
        ray.init(address=f"127.0.0.1:{nodes.port}", _node_ip_address="127.0.0.1", log_to_driver=False)
        # Ray 2.60 registers the machine's own interface address even when told 127.0.0.1:
        # either way every node is an address of this machine, nothing leaves it.
        here = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
        assert {n["NodeManagerAddress"] for n in ray.nodes()} <= here
        yield nodes
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        nodes.stop()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("mn") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}: " + PROMPTS[i % 4], "n": i}) + "\n"
                            for i in range(NUM_ROWS)))
    return path


@pytest.fixture(scope="module")
def one_node(src, tiny_model_dir):
    """id -> (text, finish reason, generated tokens) as a one-node run writes them."""
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    engine = Engine(model, tok)
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    params = [SamplingParams(max_new_tokens=MAX_NEW, temperature=TEMP, top_k=TOP_K, seed=derived_seed(SEED, r["id"]))
              for r in rows]
    return {r["id"]: (g.text, g.finish_reason, g.num_generated_tokens)
            for r, g in zip(rows, engine.generate([r["prompt"] for r in rows], params))}


def content(out: Path) -> dict:
    rows = pa.concat_tables(list(read_output(str(out), "parquet"))).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}), "an id was written twice"
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:2]
    return {r["id"]: (r["generated_text"], r["finish_reason"], r["num_generated_tokens"]) for r in rows}


def actor_nodes() -> dict[str, str]:
    """Actor id -> node id of this job's pool actors (alive or dead), from the GCS actor table."""
    return {a: info["Address"]["NodeID"] for a, info in ray._private.state.actors().items()
            if "MapWorker" in info.get("ActorClassName", "") and info["Address"]["NodeID"]}


def test_two_nodes_run_actors_on_both_and_equal_one_node(cluster, src, one_node, tiny_model_dir, tmp_path):
    worker = cluster.add_worker()
    head = ray.get_runtime_context().get_node_id()
    before = set(actor_nodes())
    out = tmp_path / "out"
    summary = load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                         f"output.path={out}", *ARGS])
    used = {n for a, n in actor_nodes().items() if a not in before}
    assert used == {head, worker}, "the pool's actors did not run on both nodes"
    assert content(out) == one_node and summary["rows_out"] == summary["rows_in"] == NUM_ROWS


def test_worker_node_killed_mid_job_loses_and_duplicates_nothing(cluster, src, one_node, tiny_model_dir, tmp_path):
    """Each actor runs two groups at once and sleeps 0.6 s per group; once a data file is
    committed and an actor runs on the worker node, the worker's raylet is SIGKILLed: Ray
    restarts that actor on the head, redoes its groups and the tasks whose outputs the node
    held; the job finishes with every row once."""
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    worker = cluster.add_worker() if len(alive) < 2 else (alive - {ray.get_runtime_context().get_node_id()}).pop()
    out, killed = tmp_path / "out", {}
    before = set(actor_nodes())

    def kill_when_busy():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            on_worker = [a for a, n in actor_nodes().items() if n == worker and a not in before]
            if on_worker and list(out.glob("part-*")):
                killed["pid"] = cluster.kill_worker_raylet()
                killed["files"] = len(list(out.glob("part-*")))
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    with env(PREPACK_FAULT_DELAY_S=0.6):  # concurrent groups sleep side by side: the job lasts as long
        summary = load_job("generate").main([f"model.path={tiny_model_dir('llama')}", f"input.path={src}",
                                             f"output.path={out}", *ARGS, "actors.max_concurrent_batches=2"])
    killer.join(timeout=5)
    assert killed.get("pid"), "the worker node was not killed mid-job"
    assert killed["files"] < NUM_ROWS // 4  # killed before the last data file
    assert worker not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert content(out) == one_node and summary["rows_out"] == summary["rows_in"] == NUM_ROWS
