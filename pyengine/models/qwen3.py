"""Qwen3: Llama with an RMSNorm over each query and key head before the rotation (config.qk_norm);
q/k/v and o bias only where attention_bias says; sliding-window layers as Qwen2 reads them."""
from pyengine.models.llama import Llama


class Qwen3(Llama):
    """Every difference is in the config (qk_norm), run by the shared decoder."""
