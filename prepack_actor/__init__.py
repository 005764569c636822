"""prepack: prepacked prefill, generation and scoring for Hugging Face causal LMs."""
from .engine import Engine, EngineConfig, GenerationResult
from .loading import ModelLoadError, load_model
from .packing import PackedBatch, ffd, pack
from .prompts import PromptError
from .sampling import SamplingParams
from .scoring import ItemError, ScoreConfig, ScoreResult, Scorer, score
from .tiny import build_tiny_model

__all__ = ["Engine", "EngineConfig", "GenerationResult", "ModelLoadError", "load_model",
           "PackedBatch", "ffd", "pack", "PromptError", "SamplingParams", "build_tiny_model",
           "ItemError", "ScoreConfig", "ScoreResult", "Scorer", "score"]
