"""kvengine: a KV-cache engine for LLM inference on PyTorch and Hugging Face transformers.

import kvengine
model = kvengine.load("smollm2-135m")
print(kvengine.generate(model, "What is a KV cache?")[0].text)
"""

__version__ = "0.1.0"

from kvengine.config import CacheConfig, ModelConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.generate import Completion, generate
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel, load

__all__ = [
    "CacheConfig",
    "Completion",
    "Engine",
    "LoadedModel",
    "ModelConfig",
    "SamplingParams",
    "SchedulerConfig",
    "__version__",
    "generate",
    "load",
]
