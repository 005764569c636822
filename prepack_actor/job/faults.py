"""Fault injection for the reliability tests: explicit, off by default (no Ray import).

Two environment variables, read once by the job's driver and handed to every actor:

    PREPACK_FAULT_EXIT_AFTER_GROUPS=N   an actor calls os._exit(1) when it starts its
                                        (N+1)-th group: a hard crash with work in flight.
                                        Once per job: the first actor to crash creates the
                                        marker file PREPACK_FAULT_MARKER (default: a file
                                        in the system temp dir named per job), and no
                                        actor crashes while it exists.
    PREPACK_FAULT_EXIT_IN_PARSE=1       the first task that parses a shard (the read stage)
                                        calls os._exit(1), once per job (the marker file
                                        PREPACK_FAULT_MARKER + ".parse"): Ray retries it.
    PREPACK_FAULT_OOM_ABOVE_TOKENS=T    a group of more than T prompt tokens raises
                                        torch.OutOfMemoryError before its prefill, as a
                                        GPU out of memory would.
    PREPACK_FAULT_DELAY_S=S             an actor sleeps S seconds before each group (so a
                                        test can kill the driver part-way).
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass


@dataclass
class FaultPlan:
    exit_after_groups: int = 0  # 0 = off
    marker: str = ""  # the once-per-job marker file for exit_after_groups
    oom_above_tokens: int = 0  # 0 = off
    delay_s: float = 0.0  # 0 = off
    exit_in_parse: bool = False

    @classmethod
    def from_env(cls) -> "FaultPlan":
        exit_after = int(os.environ.get("PREPACK_FAULT_EXIT_AFTER_GROUPS", "0") or 0)
        exit_in_parse = os.environ.get("PREPACK_FAULT_EXIT_IN_PARSE", "") not in ("", "0")
        marker = os.environ.get("PREPACK_FAULT_MARKER") or (
            os.path.join(tempfile.gettempdir(), f"prepack-fault-{uuid.uuid4().hex}")
            if exit_after or exit_in_parse else "")
        return cls(exit_after, marker, int(os.environ.get("PREPACK_FAULT_OOM_ABOVE_TOKENS", "0") or 0),
                   float(os.environ.get("PREPACK_FAULT_DELAY_S", "0") or 0), exit_in_parse)

    @property
    def active(self) -> bool:
        return bool(self.exit_after_groups or self.oom_above_tokens or self.delay_s or self.exit_in_parse)

    def to_dict(self) -> dict:
        return asdict(self)

    def before_group(self, groups_done: int) -> None:
        """Called by the actor before each group; may end the process."""
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.exit_after_groups and groups_done >= self.exit_after_groups and self.marker:
            _exit_once(self.marker)

    def in_parse(self) -> None:
        """Called by the read stage before it parses a shard; may end the process."""
        if self.exit_in_parse and self.marker:
            _exit_once(self.marker + ".parse")

    def before_prefill(self, num_tokens: int) -> None:
        """Called before each engine call on a (sub)group of num_tokens prompt tokens."""
        if self.oom_above_tokens and num_tokens > self.oom_above_tokens:
            import torch
            raise torch.OutOfMemoryError(f"injected: {num_tokens} tokens > PREPACK_FAULT_OOM_ABOVE_TOKENS")


def _exit_once(marker: str) -> None:
    """os._exit(1) unless `marker` exists (this job already crashed here once); creates it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)
