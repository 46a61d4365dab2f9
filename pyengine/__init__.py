"""pyengine: LLM inference with fused and int8 kernels, and the energy each token costs.

    import pyengine
    engine = pyengine.load("default")              # SmolLM2-135M-Instruct, or a local HF folder
    result = engine.generate("The capital of France is", max_new_tokens=20)
    print(result.text, result.usage)
"""
__version__ = "0.1.0"

from pyengine.engine import Engine, GenerationResult, Usage, generate, load  # noqa: E402
from pyengine.errors import CheckpointError, HubUnavailableError, Overloaded  # noqa: E402

__all__ = ["Engine", "GenerationResult", "Usage", "generate", "load", "CheckpointError", "HubUnavailableError", "Overloaded",
           "__version__"]
