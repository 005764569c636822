"""The scoring job's typed config (no Ray import); loaded by `config.load_config`.

It reuses the generation job's sections (model, input, output, storage, packing, actors)
and adds `scoring`. See conf/score.yaml for every key with its meaning and range.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ActorsConfig, ConfigError, InputConfig, ModelConfig, OutputConfig, PackingConfig, StorageConfig
from .scoring import MODES, NORMS


@dataclass
class ScoringOptions:
    mode: str = "shared"  # shared (prompt once, choices as tree branches) | simple (pair per segment)
    length_norm: str = "chars"  # pred_norm divides by choice chars (lm-eval acc_norm) | tokens

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"scoring.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.length_norm not in NORMS:
            raise ConfigError(f"scoring.length_norm: expected one of {', '.join(NORMS)}, got {self.length_norm!r}")


@dataclass
class ScoreJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(path="outputs/score"))
    storage: StorageConfig = field(default_factory=StorageConfig)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    packing: PackingConfig = field(default_factory=PackingConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)

    def __post_init__(self):
        if self.packing.global_sort:  # rows are grouped in the same stage that tokenizes them
            raise ConfigError("packing.global_sort: not supported by the scoring job; use a larger packing.window")
        if self.packing.memory_budget_gb:  # its formula counts decode tokens; scoring has none
            raise ConfigError("packing.memory_budget_gb: not supported by the scoring job; set packing.token_budget")
