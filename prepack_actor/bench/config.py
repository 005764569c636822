"""The benchmark job's typed config; loaded by prepack_actor.job.config_file.load_config."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..job.config import ConfigError
from .measure import CPU_CLOCKS

PREFILL_METHODS = ("full_batching", "length_ordered", "prepacking", "prepacking_best", "prepacking_varlen")
GENERATE_METHODS = ("full_batching_generate", "hf_continuous_batching", "prepack_engine")


@dataclass
class BenchmarkConfig:
    datasets: list[str] = field(default_factory=list)  # required: prompt files, passed explicitly
    batch_sizes: list[int] = field(default_factory=lambda: [32, 64])
    output_dir: str = "results/benchmark"
    model: str = ""
    model_cache_dir: str = "artifacts/bench-llama-small"
    dtype: str = "auto"
    device: str = "auto"
    methods: list[str] = field(default_factory=lambda: list(PREFILL_METHODS))
    num_batches: int = 2
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    best_capacity_multiple: float = 1.0
    best_min_width: int = 1024
    generate_methods: list[str] = field(default_factory=lambda: list(GENERATE_METHODS))
    generate_datasets: list[str] = field(default_factory=list)  # [] = the prefill datasets
    generate_batch_size: int = 64
    new_tokens: int = 64
    generate_repeats: int = 2
    cb_max_batch_tokens: int = 2048
    largest_batch: bool = True
    largest_batch_memory_gb: float = 8.0
    largest_batch_limit: int = 4096
    clock: str = "wall"  # CPU timings: wall | cpu (process CPU seconds); CUDA always uses events

    def __post_init__(self):
        for key in ("batch_sizes",):
            if not self.batch_sizes or min(self.batch_sizes) < 1:
                raise ConfigError(f"{key}: expected a non-empty list of integers >= 1, got {self.batch_sizes}")
        for key, value, allowed in (("methods", self.methods, PREFILL_METHODS),
                                    ("generate_methods", self.generate_methods, GENERATE_METHODS)):
            bad = [m for m in value if m not in allowed]
            if bad:
                raise ConfigError(f"{key}: unknown method {bad[0]!r}; expected some of {', '.join(allowed)}")
        for key in ("num_batches", "repeats", "generate_batch_size", "new_tokens", "cb_max_batch_tokens",
                    "largest_batch_limit"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        for key in ("warmup", "generate_repeats", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(self, key)!r}")
        if self.best_capacity_multiple < 1:
            raise ConfigError(f"best_capacity_multiple: expected a number >= 1, got {self.best_capacity_multiple!r}")
        if self.best_min_width < 0:
            raise ConfigError(f"best_min_width: expected an integer >= 0, got {self.best_min_width!r}")
        if self.largest_batch_memory_gb <= 0:
            raise ConfigError(f"largest_batch_memory_gb: expected a number > 0, got {self.largest_batch_memory_gb!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype: expected auto | float32 | bfloat16 | float16, got {self.dtype!r}")
        if self.clock not in CPU_CLOCKS:
            raise ConfigError(f"clock: expected wall | cpu, got {self.clock!r}")
        if not self.datasets:
            raise ConfigError("datasets: expected at least one prompt file, e.g. datasets=[../shared/data/mmlu.jsonl]")
        if not self.generate_datasets:
            self.generate_datasets = list(self.datasets)
