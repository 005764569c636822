"""Running prepack on Ray Data: the only package that imports ray.

    processor = build_processor(ProcessorConfig(task="generate", ...), preprocess, postprocess)
    ds = processor(ds)                   # a stage in your own pipeline (stage.py)
    summary = pipeline.run(cfg)          # the jobs: read shards -> the same stage -> write -> summary

Exports load lazily, so `prepack_actor.job.config` (the config loader) does not start Ray imports.
"""
from .config import (ActorsConfig, GenerateConfig, ModelConfig, PackingConfig, ProcessorConfig, PromptsConfig,
                     SamplingConfig, ScoreJobConfig, ScoringConfig)

__all__ = ["ActorsConfig", "GenerateConfig", "ModelConfig", "PackingConfig", "ProcessorConfig", "PromptsConfig",
           "SamplingConfig", "ScoreJobConfig", "ScoringConfig", "build_processor", "Processor"]


def __getattr__(name: str):
    if name in ("build_processor", "Processor"):
        from . import stage
        return getattr(stage, name)
    raise AttributeError(name)
