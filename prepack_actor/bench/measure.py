"""Honest timing and peak memory: device sync, warm-up, interleaved repeats, medians.

Peak memory
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the
  bytes allocated before the call (so the weights are not counted).
- CPU: the process's resident-set high-water mark. Linux resets it when "5" is written
  to /proc/self/clear_refs; after the call VmHWM - VmRSS(before) is the peak of what the
  call added. Unlike the profiler's allocation totals this is a true peak, costs nothing,
  and sees every allocation (torch, tokenizer, Python). glibc is told to serve large
  blocks from mmap (fixed threshold, 128 KiB) so freed tensors leave the RSS at once and
  one method's freed heap cannot hide the next one's peak. Where clear_refs is not
  writable a 1 ms sampling thread over RSS is the fallback.
"""
from __future__ import annotations

import ctypes
import statistics
import threading
import time
from typing import Callable

import torch

_M_MMAP_THRESHOLD = -3


def prepare_cpu_allocator() -> None:
    """Large allocations from mmap with a fixed threshold (RSS follows live tensors)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except OSError:
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The CPU timeline: "wall" (perf_counter) or "cpu" (this process's CPU seconds, all its
# threads: robust to other work on a shared machine). Set once per run by use_clock.
CPU_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_cpu_clock = CPU_CLOCKS["wall"]


def use_clock(name: str) -> None:
    global _cpu_clock
    _cpu_clock = CPU_CLOCKS[name]


class Clock:
    """Timestamps on the device's timeline: CUDA events on GPU, use_clock's clock on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(_cpu_clock())

    def seconds(self) -> list[float]:
        """Intervals between consecutive marks, in seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise OSError(field)


class PeakMemory:
    """with PeakMemory(device) as m: ...; m.bytes is the call's peak added memory."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.source = device, 0, ""

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _rss_kib("VmRSS:") * 1024
            self.source, self._thread = "rss_high_water (VmHWM after clear_refs)", None
        except OSError:
            import psutil
            proc = psutil.Process()
            self._base = self._peak = proc.memory_info().rss
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.001):
                    self._peak = max(self._peak, proc.memory_info().rss)
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
            self.source = "rss_sampled_1ms"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is None:
            self.bytes = _rss_kib("VmHWM:") * 1024 - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = self._peak - self._base
        return False


def interleaved(runners: dict[str, Callable[[bool], dict]], repeats: int, warmup: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, list[dict]]:
    """Run every runner once per round (A, B, C, A, B, C, ...); warm-up rounds are dropped.

    A runner takes `warm` (True: a warm-up round, which may run a smaller input) and
    returns a dict of measurements. The order rotates each round so no method always
    runs right after the same neighbour.
    """
    names = list(runners)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(warmup + repeats if names else 0):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            m = runners[n](r < warmup)
            if r >= warmup:
                out[n].append(m)
            log(f"  {'warm-up' if r < warmup else f'repeat {r - warmup + 1}'} {n}: "
                + ", ".join(f"{k}={v:.3g}" for k, v in m.items() if isinstance(v, float)))
    return out


def summarize(values: list[float]) -> dict:
    """median / min / max of one measurement over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}
