"""Qwen3: Llama with an RMSNorm over each query and key head before the rotation (config.qk_norm);
q/k/v bias only where attention_bias says; sliding-window layers as Qwen2 reads them."""
from pyengine.models.llama import Llama


class Qwen3(Llama):
    pass  # every difference is in the config (qk_norm) and the shared decoder
