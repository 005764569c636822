"""Shared fixtures: small random-weight checkpoints built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prepack_actor.tiny import build_tiny_model  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> checkpoint dir of a tiny random `arch` model (built once)."""
    built: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in built:
            built[arch] = str(build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}")))
        return built[arch]

    return get


# ---- Ray and S3 fixtures (generation / scoring jobs) ----------------------------------
import contextlib  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).parent / "ray")


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never returned before in this process: the kernel may hand
    the same ephemeral port to two closed sockets in a row, and `ray start` given one port for
    two of its servers fails."""
    while True:
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (2 CPUs, no dashboard) for in-process job runs; shut down after."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1:<free port>; sets AWS_* env vars; yields the endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with free ports and a private temp dir; yields the
    dashboard address for `ray job submit --address`. Stopped (this cluster only) after."""
    temp = Path("/tmp") / f"rt{os.getpid()}"  # short: Ray's socket paths have a length limit
    ports = {k: free_port() for k in ("port", "dashboard", "client", "metrics", "agent_grpc",
                                      "agent_http", "node_manager", "object_manager", "runtime_env_agent")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [RAY_BIN, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['port']}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--ray-client-server-port={ports['client']}", f"--metrics-export-port={ports['metrics']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
           f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}",
           "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        yield {"address": address, "gcs": f"127.0.0.1:{ports['port']}", "env": env}
    finally:
        # `ray stop` would stop every Ray on the machine (colleagues' too): stop only ours.
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: Path) -> None:
    """Kill the processes of the Ray session under `temp` (and only those)."""
    import psutil
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp) in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
