"""Gemma 3 (text): Llama with q/k RMSNorm per head, RMSNorm around each sub-block ("sandwich": before,
and on its output before the residual add), GeGLU (tanh GELU), embeddings x sqrt(hidden), RMSNorm as
x * (1 + w) (the 1 folded into the weights at load, in fp32), attention scale query_pre_attn_scalar ** -0.5,
logits soft-capped where final_logit_softcapping is set, and two rotary tables: the sliding-window
layers' own base (rope_local_base_freq, unscaled) and the full layers' rope_theta with rope_scaling."""
from pyengine.load.config import rope_inverse_frequencies
from pyengine.models.llama import Llama


class Gemma3(Llama):
    mlp_norm_name = "pre_feedforward_layernorm"
    attn_out_norm_name = "post_attention_layernorm"
    mlp_out_norm_name = "post_feedforward_layernorm"

    def rope_specs(self):
        local = rope_inverse_frequencies(self.config, theta=self.config.local_rope_theta, scaling={})
        return {**super().rope_specs(), "local": (local, 1.0)}

    def rope_table_of(self, layer_index):
        return "local" if layer_index in self.config.local_rope_layers else "default"
