"""Llama family: Llama 2/3, SmolLM, TinyLlama, Mistral (sliding window), Qwen2 (q/k/v bias, sliding
window on some layers).

pre-norm decoder: x += attn(rms_norm(x)); x += mlp(rms_norm(x)), with rotary positions and
grouped-query attention. q/k/v and gate/up are each one fused projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.loader import WeightReader
from pyengine.models.base import DecoderModel


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor
    qkv: object  # backend linear weights: [(Hq + 2 Hkv) D, hidden]
    out: object
    mlp_norm: torch.Tensor
    gate_up: object  # [2 I, hidden]
    down: object
    window: int = 0  # > 0: this layer's attention sees only the last `window` positions


class Llama(DecoderModel):
    def __init__(self, config, reader: WeightReader, backend, device="cpu"):
        super().__init__(config, backend, device)
        c = config
        H, D, I = c.hidden_size, c.head_dim, c.intermediate_size
        q_out, kv_out = c.num_heads * D, c.num_kv_heads * D

        def param(name, shape):
            return reader.take(name, shape).to(self.device)

        def matrix(name, shape):  # a linear weight, as stored: the backend converts it as it places it
            return reader.take_stored(name, shape).to(self.device)

        def bias(name, size, present):
            return param(name, (size,)) if present else None

        self.embed = param("model.embed_tokens.weight", (c.vocab_size, H))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv_names = [(p + f"self_attn.{n}_proj", size) for n, size in (("q", q_out), ("k", kv_out), ("v", kv_out))]
            qkv_w = torch.cat([matrix(n + ".weight", (size, H)) for n, size in qkv_names])
            qkv_b = torch.cat([param(n + ".bias", (size,)) for n, size in qkv_names]) if c.attention_bias else None
            gate_up_b = (torch.cat([param(p + "mlp.gate_proj.bias", (I,)), param(p + "mlp.up_proj.bias", (I,))])
                         if c.mlp_bias else None)
            self.layers.append(LlamaLayer(
                attn_norm=param(p + "input_layernorm.weight", (H,)),
                qkv=backend.prepare_linear(qkv_w, qkv_b, name=p + "self_attn.qkv_proj"),
                out=backend.prepare_linear(matrix(p + "self_attn.o_proj.weight", (H, q_out)),
                                           bias(p + "self_attn.o_proj.bias", H, c.o_bias), name=p + "self_attn.o_proj"),
                mlp_norm=param(p + "post_attention_layernorm.weight", (H,)),
                gate_up=backend.prepare_linear(torch.cat([matrix(p + "mlp.gate_proj.weight", (I, H)),
                                                          matrix(p + "mlp.up_proj.weight", (I, H))]), gate_up_b,
                                                name=p + "mlp.gate_up_proj"),
                down=backend.prepare_linear(matrix(p + "mlp.down_proj.weight", (H, I)),
                                            bias(p + "mlp.down_proj.bias", H, c.mlp_bias), name=p + "mlp.down_proj"),
                window=c.layer_windows[i] if c.layer_windows else 0,
            ))
        self.final_norm = param("model.norm.weight", (H,))
        tied = c.tie_word_embeddings or not reader.has("lm_head.weight")
        self.lm_head = backend.prepare_linear(self.embed if tied else matrix("lm_head.weight", (c.vocab_size, H)),
                                              name="lm_head")
        if tied:
            self.embed = backend.tied_embedding(self.lm_head, self.embed)

    def make_cpp_decoder(self):
        return self.backend.make_llama_decoder(self)

    def _decoder_tables(self, cache):
        return self._rope_tables(cache.capacity)  # every position the cache can hold; no per-step max()

    def hidden_states(self, tokens, cache, step):
        c, ops = self.config, self.backend
        B, T = tokens.shape
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        scale = c.head_dim ** -0.5
        x = ops.embedding(tokens, self.embed)
        pending = None  # the previous sub-block's output, added to x inside the next norm
        for i, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.attn_norm, c.norm_eps) if pending is None else \
                ops.add_rms_norm(x, pending, layer.attn_norm, c.norm_eps)
            q, k, v = ops.linear(h, layer.qkv).split((q_size, kv_size, kv_size), dim=-1)
            q = ops.rope(q.reshape(B, T, c.num_heads, c.head_dim), step)
            k = ops.rope(k.reshape(B, T, c.num_kv_heads, c.head_dim), step)
            cache.write(i, k, v.reshape(B, T, c.num_kv_heads, c.head_dim), step.q_start, step.uniform_start)
            attn = ops.attention(q, cache.keys[i], cache.values[i], step, scale, layer.window)
            h = ops.add_rms_norm(x, ops.linear(attn.reshape(B, T, q_size), layer.out), layer.mlp_norm, c.norm_eps)
            gate, up = ops.linear(h, layer.gate_up).chunk(2, dim=-1)
            pending = ops.linear(ops.silu_mul(gate, up), layer.down)
        return ops.add_rms_norm(x, pending, self.final_norm, c.norm_eps)
