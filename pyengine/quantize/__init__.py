"""int8 weights: absmax rounding, GPTQ, int8 files keyed by layer name."""
