"""Fault injection for the reliability tests: explicit, off by default (no Ray import).

Two environment variables, read once by the job's driver and handed to every actor:

    PREPACK_FAULT_EXIT_AFTER_GROUPS=N   an actor calls os._exit(1) when it starts its
                                        (N+1)-th group: a hard crash with work in flight.
                                        Once per job: the first actor to crash creates the
                                        marker file PREPACK_FAULT_MARKER (default: a file
                                        in the system temp dir named per job), and no
                                        actor crashes while it exists.
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

    @classmethod
    def from_env(cls) -> "FaultPlan":
        exit_after = int(os.environ.get("PREPACK_FAULT_EXIT_AFTER_GROUPS", "0") or 0)
        marker = os.environ.get("PREPACK_FAULT_MARKER") or (
            os.path.join(tempfile.gettempdir(), f"prepack-fault-{uuid.uuid4().hex}") if exit_after else "")
        return cls(exit_after, marker, int(os.environ.get("PREPACK_FAULT_OOM_ABOVE_TOKENS", "0") or 0),
                   float(os.environ.get("PREPACK_FAULT_DELAY_S", "0") or 0))

    @property
    def active(self) -> bool:
        return bool(self.exit_after_groups or self.oom_above_tokens or self.delay_s)

    def to_dict(self) -> dict:
        return asdict(self)

    def before_group(self, groups_done: int) -> None:
        """Called by the actor before each group; may end the process."""
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.exit_after_groups and groups_done >= self.exit_after_groups and self.marker:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # this job already crashed once
            os.close(fd)
            os._exit(1)

    def before_prefill(self, num_tokens: int) -> None:
        """Called before each engine call on a (sub)group of num_tokens prompt tokens."""
        if self.oom_above_tokens and num_tokens > self.oom_above_tokens:
            import torch
            raise torch.OutOfMemoryError(f"injected: {num_tokens} tokens > PREPACK_FAULT_OOM_ABOVE_TOKENS")
