"""Typed configs for the Ray Data stage and the jobs (no Ray import); loaded by config_file.py.

A `ProcessorConfig` (task, model, packing, actors, and the task's own section) is what the
composable stage takes (`job.stage.build_processor`); a job config is that plus input,
output and storage. One name per knob, the same in Python, YAML and docs. `__post_init__`
checks ranges and choices and raises `ConfigError` with one line naming the key and what
was expected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad config file, key, type or value; the message is one line for the user."""


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}: expected a number >= {low}, got {value!r}")


@dataclass
class ModelConfig:
    path: str = "tiny:llama"  # HF id, local dir, or tiny:ARCH[:SIZE] (built locally once)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    attn_implementation: str = "auto"  # auto (sdpa where the model has it, else eager) | sdpa | eager
    cache_dir: str = "artifacts/models"  # where tiny:* checkpoints are built
    trust_remote_code: bool = False  # true: run a checkpoint's own Python code (auto_map); never asked interactively
    onednn_linear: bool = True  # CPU: linear layers on oneDNN with prepacked weights (a second copy of the weights)
    compile: bool = False  # decoder layers compiled by inductor (up to 13% faster CPU prefill; 10-25 s per actor; needs a C++ compiler)

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"model.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
        _choice("model.attn_implementation", self.attn_implementation, ("auto", "sdpa", "eager"))
        if not self.path:
            raise ConfigError("model.path: expected an HF id, a directory or tiny:ARCH, got ''")


@dataclass
class StorageConfig:
    endpoint_url: str = ""  # S3 endpoint; "" = AWS_ENDPOINT_URL(_S3) env var or AWS default
    region: str = ""  # S3 region; "" = AWS_DEFAULT_REGION env var
    anon: bool = False  # unsigned S3 requests (public buckets)
    max_attempts: int = 10  # S3 attempts per request (botocore retries: throttling, 5xx, dropped connections)
    retry_mode: str = "adaptive"  # botocore retry mode: standard | adaptive (standard + client-side rate limit)

    def __post_init__(self):
        _at_least("storage.max_attempts", self.max_attempts, 1)
        _choice("storage.retry_mode", self.retry_mode, ("standard", "adaptive", "legacy"))


@dataclass
class InputConfig:
    path: str = ""  # file, dir, glob or URL (s3://bucket/prefix/); "" = bundled sample
    format: str = "auto"  # jsonl | parquet | auto (by file extension)
    limit: int = 0  # run only the first N rows (in shard order), >= 0; 0 = all
    duplicate_ids: str = "error"  # a repeated id: error (a duplicate_id row) | suffix (runs as <id>#<k>)

    def __post_init__(self):
        _choice("input.format", self.format, ("jsonl", "parquet", "auto"))
        _choice("input.duplicate_ids", self.duplicate_ids, ("error", "suffix"))
        _at_least("input.limit", self.limit, 0)


@dataclass
class OutputConfig:
    path: str = "outputs/generate"  # output dir, local or URL; _summary.json goes beside the shards
    format: str = "parquet"  # parquet | jsonl
    mode: str = "resume"  # resume (run only ids not yet written) | overwrite | error_if_exists
    rows_per_file: int = 20000  # rows per data file, >= 0 (0 = by size only); the last file holds the rest
    file_mb: float = 128.0  # a data file is cut at about this many MB of staged output, >= 0 (0 = by rows only)
    lease_s: float = 60.0  # the output path's lease (one job at a time) lasts this long unless renewed, > 0

    def __post_init__(self):
        if self.lease_s <= 0:
            raise ConfigError(f"output.lease_s: expected a number > 0, got {self.lease_s!r}")
        _choice("output.format", self.format, ("parquet", "jsonl"))
        _choice("output.mode", self.mode, ("error_if_exists", "overwrite", "resume"))
        _at_least("output.rows_per_file", self.rows_per_file, 0)
        _at_least("output.file_mb", self.file_mb, 0)
        if not self.rows_per_file and not self.file_mb:
            raise ConfigError("output.rows_per_file, output.file_mb: expected at least one of them > 0, got 0 and 0")
        if not self.path:
            raise ConfigError("output.path: expected a directory or URL, got ''")


@dataclass
class SamplingConfig:
    """The job's sampling settings: core.sampling.SamplingParams's fields (vLLM's names and
    ranges, checked there), except `seed`, the base seed each row's seed derives from. A row
    may override any of them in its `sampling_params` (docs/generate.md)."""

    max_new_tokens: int = 32  # per row at most, >= 1
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0  # keep the k most likely tokens, >= 0; 0 disables
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one, in [0, 1]; 0 disables
    seed: int = 0  # base seed; a row without its own seed gets one derived from this and its id
    n: int = 1  # completions per row, >= 1 (one prefill, the prompt's cache copied n times)
    stop: list[str] = field(default_factory=list)  # strings that end a generation
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end a generation
    ignore_eos: bool = False  # keep generating past EOS (fixed-length benchmarks)
    min_tokens: int = 0  # no EOS / stop token / stop string before this many tokens, in [0, max_new_tokens]
    repetition_penalty: float = 1.0  # > 0; 1 disables; prompt and generated tokens
    presence_penalty: float = 0.0  # in [-2, 2]; generated tokens
    frequency_penalty: float = 0.0  # in [-2, 2]; generated tokens, per occurrence
    logprobs: Optional[int] = None  # null = off; k >= 0: each token's log-prob and the top k

    def __post_init__(self):
        _at_least("sampling.seed", self.seed, 0)
        self.params()

    def params(self):
        """The SamplingParams every row starts from (seed None: rows get their own)."""
        from ..core.params import SamplingParams
        values = {k: getattr(self, k) for k in SamplingParams.__dataclass_fields__ if k != "seed"}
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise ConfigError(f"sampling.{e}") from None


@dataclass
class PackingConfig:
    pack_capacity: Optional[int] = None  # packed row width in tokens, >= 1; null = longest prompt of the group (paper)
    max_group_tokens: int = 4096  # prompt tokens per group (one forward pass, one actor call), >= 1
    max_group_prompts: int = 64  # prompts (generate) or items (score) per group, >= 1
    max_num_seqs: int = 128  # generate: sequences decoding at once per actor, >= 1; waiting prompts (of
    #                         concurrent groups: actors.max_concurrent_batches) join as others finish (docs/decode.md)
    window: int = 1024  # rows sorted by length together before grouping (bounds memory), >= 1
    global_sort: bool = False  # true: sort the whole dataset by length first (a global shuffle)
    memory_budget_gb: float = 0.0  # > 0: derive max_group_tokens from this per-actor budget (docs/failure.md); 0 = off

    def __post_init__(self):
        if self.pack_capacity is not None:
            _at_least("packing.pack_capacity", self.pack_capacity, 1)
        _at_least("packing.memory_budget_gb", self.memory_budget_gb, 0)
        _at_least("packing.max_group_tokens", self.max_group_tokens, 1)
        _at_least("packing.max_group_prompts", self.max_group_prompts, 1)
        _at_least("packing.max_num_seqs", self.max_num_seqs, 1)
        _at_least("packing.window", self.window, 1)


@dataclass
class ActorsConfig:
    concurrency: Any = 1  # actors in the pool: N (>= 1) or [MIN, MAX] to autoscale between them
    gpus_per_actor: float = 0.0  # GPUs per actor, >= 0; 0 = CPU actors
    cpus_per_actor: float = 1.0  # CPUs reserved per actor, > 0
    torch_threads: int = 0  # torch intra-op threads per actor, >= 0; 0 = Ray's default (= CPUs)
    max_tasks_in_flight: int = 2  # groups sent to an actor at once (running and queued), >= 1; at least 2 x max_concurrent_batches
    # generate: groups an actor runs at once, sharing one running batch (engine_loop.py), >= 0; 0 = enough
    # to keep packing.max_num_seqs decoding (max_num_seqs / max_group_prompts, rounded up, + 1), at most 8
    max_concurrent_batches: int = 0
    max_restarts: int = 4  # times Ray restarts a dead actor (crash, OOM kill), >= -1 (-1 = forever)
    max_task_retries: int = 4  # times a group is retried after its actor died, >= -1 (-1 = forever)
    placement_timeout_s: float = 60.0  # fail when the cluster cannot place the pool within this, > 0
    # auto: actors preload tcmalloc (LD_PRELOAD libtcmalloc_minimal.so.4, Debian's libtcmalloc-minimal4) when this
    # machine has it and LD_PRELOAD is unset (fewer page faults; README "Allocator") | system: the C library's malloc
    allocator: str = "auto"

    def __post_init__(self):
        if self.placement_timeout_s <= 0:
            raise ConfigError(f"actors.placement_timeout_s: expected a number > 0, got {self.placement_timeout_s!r}")
        c = self.concurrency
        if isinstance(c, (list, tuple)) or hasattr(c, "__len__"):
            c = list(c)
            if not (len(c) == 2 and all(_is_int(x) for x in c) and 1 <= c[0] <= c[1]):
                raise ConfigError(f"actors.concurrency: expected N >= 1 or [MIN, MAX] with 1 <= MIN <= MAX, got {c!r}")
            self.concurrency = (c[0], c[1])
        elif not _is_int(c) or c < 1:
            raise ConfigError(f"actors.concurrency: expected N >= 1 or [MIN, MAX] with 1 <= MIN <= MAX, got {c!r}")
        _at_least("actors.gpus_per_actor", self.gpus_per_actor, 0)
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"actors.cpus_per_actor: expected a number > 0, got {self.cpus_per_actor!r}")
        _at_least("actors.torch_threads", self.torch_threads, 0)
        _at_least("actors.max_tasks_in_flight", self.max_tasks_in_flight, 1)
        _at_least("actors.max_concurrent_batches", self.max_concurrent_batches, 0)
        _choice("actors.allocator", self.allocator, ("auto", "system"))
        _at_least("actors.max_restarts", self.max_restarts, -1)
        _at_least("actors.max_task_retries", self.max_task_retries, -1)


@dataclass
class PromptsConfig:
    over_long: str = "error"  # error: an error row | truncate: keep the prompt's last tokens
    max_prompt_tokens: int = 0  # >= 0; 0 = model context minus the row's max_new_tokens

    def __post_init__(self):
        _choice("prompts.over_long", self.over_long, ("error", "truncate"))
        _at_least("prompts.max_prompt_tokens", self.max_prompt_tokens, 0)


MODES = ("shared", "simple")  # scoring layouts (prepack_actor.scoring)
NORMS = ("chars", "tokens")


@dataclass
class ScoringConfig:
    mode: str = "shared"  # shared (one unit per distinct prompt, choices read from it) | simple (pair per segment)
    length_norm: str = "chars"  # pred_norm divides by choice chars (lm-eval acc_norm) | tokens
    max_length: Optional[int] = None  # loglikelihood_rolling windows in tokens (lm-eval's max_length), >= 1; null = the model's context

    def __post_init__(self):
        _choice("scoring.mode", self.mode, MODES)
        _choice("scoring.length_norm", self.length_norm, NORMS)
        if self.max_length is not None:
            _at_least("scoring.max_length", self.max_length, 1)


TASKS = ("generate", "score")
MAX_AUTO_BATCHES = 8  # ray.data.llm's default max_concurrent_batches: the cap of the derived default (small groups)


@dataclass
class ProcessorConfig:
    """What the Ray Data stage needs: the task, the model, grouping, actors, task options."""

    task: str = "generate"  # generate | score
    model: ModelConfig = field(default_factory=ModelConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # generate only
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # generate only
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # score only

    def __post_init__(self):
        _choice("task", self.task, TASKS)

    @property
    def concurrent_batches(self) -> int:
        """Groups an actor runs at once: generate shares one running batch; scoring runs one."""
        if self.task != "generate":
            return 1
        p = self.packing
        return self.actors.max_concurrent_batches or min(-(-p.max_num_seqs // p.max_group_prompts) + 1, MAX_AUTO_BATCHES)


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)

    def processor(self) -> ProcessorConfig:
        return ProcessorConfig("generate", self.model, self.packing, self.actors, sampling=self.sampling,
                               prompts=self.prompts)


@dataclass
class ScoreJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(path="outputs/score"))
    storage: StorageConfig = field(default_factory=StorageConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    packing: PackingConfig = field(default_factory=lambda: PackingConfig(max_group_prompts=256))
    actors: ActorsConfig = field(default_factory=ActorsConfig)

    def processor(self) -> ProcessorConfig:
        return ProcessorConfig("score", self.model, self.packing, self.actors, scoring=self.scoring)
