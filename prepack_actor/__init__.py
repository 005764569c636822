"""prepack: prepacked prefill, generation and scoring for Hugging Face causal LMs.

core/ is the mechanism (tensors only); engine, scoring, inputs and models are the library;
job/ runs it on Ray Data (the only package that imports ray); bench/ measures it.
"""
from .core.packing import PackedBatch, ffd, pack
from .core.sampling import SamplingParams
from .engine import Engine, EngineConfig, GenerationResult
from .inputs import InputError, ItemError, PromptError
from .models import ModelLoadError, load_model
from .scoring import ScoreConfig, ScoreResult, Scorer, score
from .tiny import build_tiny_model

__all__ = ["Engine", "EngineConfig", "GenerationResult", "ModelLoadError", "load_model",
           "PackedBatch", "ffd", "pack", "InputError", "PromptError", "SamplingParams", "build_tiny_model",
           "ItemError", "ScoreConfig", "ScoreResult", "Scorer", "score"]
