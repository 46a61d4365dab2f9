"""pyengine: LLM inference with fused and int8 kernels, and the energy each token costs."""
__version__ = "0.1.0"
