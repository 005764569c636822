"""One job per output path: a lease file in the output folder (no Ray import).

    lease = acquire_lease("s3://bucket/out/", storage, ttl_s=60)   # JobError naming the holder
    lease.check()                  # JobError if another job took the path over (ours had expired)
    lease.release()                # at the end, whatever happened

`_lease.json` holds {owner, host, pid, started, expires_at}. It is created only if absent:
locally by a hard link of a complete temporary file (atomic, fails when the name exists),
on S3 by a conditional PUT (If-None-Match: *), so two jobs can never both create it. The
holder renews it every ttl_s / 3 from a thread of the driver; a job killed without
releasing it blocks the path until expires_at (ttl_s after the last renewal), then the
next job deletes the stale lease and creates its own; on the holder's own machine (same
host name, boot and PID namespace) a lease whose process is gone is taken over at once. Expiry compares wall clocks of the
machines involved (keep them in sync, e.g. NTP). A renewal that finds another owner marks
the lease lost: the job stops at its next check, before it commits anything more.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

from .config import StorageConfig
from .storage import filesystem, write_bytes_atomic

LEASE_NAME = "_lease.json"


def _machine() -> dict:
    """What makes a pid meaningful: host name, kernel boot and PID namespace (Linux; else None)."""
    def read(f):
        try:
            with open(f) as fh:
                return fh.read().strip()
        except OSError:
            return None
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _dead_here(held: dict) -> bool:
    """The holder ran on this machine, in this PID namespace (containers sharing a host name do
    not count), and its process is gone or a zombie (a killed driver): no need to wait for the
    lease to expire. (A reused pid only makes us wait for the expiry, never less safe.)"""
    import psutil
    pid = held.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or any(held.get(k) != v for k, v in _machine().items()):
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


class LeaseError(RuntimeError):
    """The output path is held by another job (the message is one line, naming it)."""


class Lease:
    def __init__(self, path: str, storage: StorageConfig | None, ttl_s: float):
        self.path, self.storage, self.ttl_s = path, storage, ttl_s
        self.file = f"{path.rstrip('/')}/{LEASE_NAME}"
        self.fs, self.root = filesystem(self.file, storage)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, **_machine(), "pid": os.getpid(),
                           "started": self.started, "expires_at": time.time() + self.ttl_s}).encode()

    def read(self) -> dict | None:
        """The lease now in the folder; {} when it exists but cannot be read; None when absent."""
        try:
            data = self.fs.cat_file(self.root)
        except FileNotFoundError:
            return None
        try:
            held = json.loads(data)
            return held if isinstance(held, dict) else {}
        except ValueError:
            return {}

    def acquire(self) -> "Lease":
        for _ in range(5):
            try:
                write_bytes_atomic(self._body(), self.file, self.storage, create=True)
            except FileExistsError:
                held = self.read()
                if held is None:  # released meanwhile: try again
                    continue
                expires = held.get("expires_at")
                if isinstance(expires, (int, float)) and expires > time.time() and not _dead_here(held):
                    raise LeaseError(
                        f"output.path {self.path!r} is in use by another job: {held.get('owner')} (started "
                        f"{held.get('started')}, lease valid {expires - time.time():.0f} s more unless renewed; "
                        f"{LEASE_NAME}). Wait for it, use another output.path, or delete {LEASE_NAME} if that "
                        f"job is gone")
                print(f"output: taking over the expired (or dead) lease of {held.get('owner', 'an unreadable lease')} "
                      f"on {self.path!r}")
                self.fs.rm(self.root)
                continue
            if (self.read() or {}).get("owner") != self.owner:  # another job won a take-over race
                continue
            self._thread = threading.Thread(target=self._renew_loop, name="prepack-lease", daemon=True)
            self._thread.start()
            return self
        raise LeaseError(f"output.path {self.path!r}: could not take its lease ({LEASE_NAME}) after 5 tries; "
                         "another job is starting there")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a transient store error: the next renewal tries again
                print(f"warning: could not renew the lease on {self.path!r}: {type(e).__name__}: {e}")

    def renew(self) -> None:
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            self.lost = (f"output.path {self.path!r}: this job's lease was taken over by "
                         f"{(held or {}).get('owner', 'nobody (deleted)')}; stopping so two jobs never "
                         f"write one output (raise output.lease_s if renewals are late)")
            self._stop.set()
            return
        write_bytes_atomic(self._body(), self.file, self.storage)

    def check(self) -> None:
        if self.lost:
            raise LeaseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self.read() or {}).get("owner") == self.owner:
                self.fs.rm(self.root)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            print(f"warning: could not release the lease on {self.path!r}: {type(e).__name__}: {e}")


def acquire_lease(path: str, storage: StorageConfig | None, ttl_s: float) -> Lease:
    return Lease(path, storage, ttl_s).acquire()
