"""Checkpoints in: config, safetensors, tokenizer, the default model."""
