"""Llama family: Llama 2/3, SmolLM, TinyLlama, Mistral (sliding window), Qwen2 (q/k/v bias, sliding
window on some layers); and the decoder that the Llama-like families (qwen3.py, gemma3.py, phi3.py)
parameterize.

pre-norm decoder: x += attn(rms_norm(x)); x += mlp(rms_norm(x)), with rotary positions and
grouped-query attention. q/k/v and gate/up are each one fused projection. What a family changes is
in its config (ModelConfig: qk_norm, sandwich_norms, activation, embed_scale, norm_offset, attn_scale,
final_logit_softcap, rope tables) and in the few methods below that name its weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.load.checkpoint import WeightReader
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
    q_norm: torch.Tensor | None = None  # [head_dim]: RMSNorm of each query head (config.qk_norm)
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # RMSNorm of the attention's output (config.sandwich_norms)
    mlp_out_norm: torch.Tensor | None = None  # RMSNorm of the MLP's output


class Llama(DecoderModel):
    # The checkpoint's names of the norm before the MLP and (sandwich_norms) after each sub-block.
    mlp_norm_name = "post_attention_layernorm"
    attn_out_norm_name = None
    mlp_out_norm_name = None

    def __init__(self, config, reader: WeightReader, backend, device="cpu"):
        super().__init__(config, backend, device)
        c = config
        self.reader = reader
        H = c.hidden_size
        q_out = c.num_heads * c.head_dim

        self.embed = self.param("model.embed_tokens.weight", (c.vocab_size, H))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            qkv_w, qkv_b = self.load_qkv(p)
            gate_up_w, gate_up_b = self.load_gate_up(p)
            self.layers.append(LlamaLayer(
                attn_norm=self.norm(p + "input_layernorm.weight", H),
                qkv=backend.prepare_linear(qkv_w, qkv_b, name=p + "self_attn.qkv_proj"),
                out=backend.prepare_linear(self.matrix(p + "self_attn.o_proj.weight", (H, q_out)),
                                           self.param(p + "self_attn.o_proj.bias", (H,)) if c.o_bias else None,
                                           name=p + "self_attn.o_proj"),
                mlp_norm=self.norm(p + self.mlp_norm_name + ".weight", H),
                gate_up=backend.prepare_linear(gate_up_w, gate_up_b, name=p + "mlp.gate_up_proj"),
                down=backend.prepare_linear(self.matrix(p + "mlp.down_proj.weight", (H, c.intermediate_size)),
                                            self.param(p + "mlp.down_proj.bias", (H,)) if c.mlp_bias else None,
                                            name=p + "mlp.down_proj"),
                window=c.layer_windows[i] if c.layer_windows else 0,
                q_norm=self.norm(p + "self_attn.q_norm.weight", c.head_dim) if c.qk_norm else None,
                k_norm=self.norm(p + "self_attn.k_norm.weight", c.head_dim) if c.qk_norm else None,
                attn_out_norm=self.norm(p + self.attn_out_norm_name + ".weight", H) if c.sandwich_norms else None,
                mlp_out_norm=self.norm(p + self.mlp_out_norm_name + ".weight", H) if c.sandwich_norms else None,
            ))
        self.final_norm = self.norm("model.norm.weight", H)
        tied = c.tie_word_embeddings or not reader.has("lm_head.weight")
        self.lm_head = backend.prepare_linear(self.embed if tied else self.matrix("lm_head.weight", (c.vocab_size, H)),
                                              name="lm_head")
        if tied:
            self.embed = backend.tied_embedding(self.lm_head, self.embed)
        del self.reader

    # --- loading: what a family with other weight names overrides ---
    def param(self, name, shape):
        return self.reader.take(name, shape).to(self.device)

    def matrix(self, name, shape):  # a linear weight, as stored: the backend converts it as it places it
        return self.reader.take_stored(name, shape).to(self.device)

    def norm(self, name, size):
        """An RMSNorm weight; config.norm_offset folded in (Gemma's 1 + w, added in fp32 as transformers does)."""
        if not self.config.norm_offset:
            return self.param(name, (size,))
        w = self.reader.take_stored(name, (size,)).float() + self.config.norm_offset
        return w.to(self.reader.dtype).to(self.device)

    def load_qkv(self, p):
        """(weight, bias or None) of the fused q/k/v projection, [q; k; v] rows."""
        c = self.config
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        names = [(p + f"self_attn.{n}_proj", size) for n, size in (("q", q_out), ("k", kv_out), ("v", kv_out))]
        weight = torch.cat([self.matrix(n + ".weight", (size, c.hidden_size)) for n, size in names])
        bias = torch.cat([self.param(n + ".bias", (size,)) for n, size in names]) if c.attention_bias else None
        return weight, bias

    def load_gate_up(self, p):
        """(weight, bias or None) of the fused gate/up projection, [gate; up] rows."""
        c = self.config
        I, H = c.intermediate_size, c.hidden_size
        weight = torch.cat([self.matrix(p + "mlp.gate_proj.weight", (I, H)), self.matrix(p + "mlp.up_proj.weight", (I, H))])
        bias = (torch.cat([self.param(p + "mlp.gate_proj.bias", (I,)), self.param(p + "mlp.up_proj.bias", (I,))])
                if c.mlp_bias else None)
        return weight, bias

    # --- running ---
    def rope_table_of(self, layer_index: int) -> str:
        """The name of the step's rotary table that layer `layer_index` uses."""
        return "default"

    def hidden_states(self, tokens, cache, step):
        c, ops = self.config, self.backend
        B, T = tokens.shape
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        scale = c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5
        mlp_act = ops.gelu_mul if c.activation == "gelu_tanh" else ops.silu_mul
        x = ops.embedding(tokens, self.embed) if c.embed_scale is None else \
            ops.embedding(tokens, self.embed, scale=c.embed_scale)
        pending = None  # the previous sub-block's output, added to x inside the next norm
        for i, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.attn_norm, c.norm_eps) if pending is None else \
                ops.add_rms_norm(x, pending, layer.attn_norm, c.norm_eps)
            q, k, v = ops.linear(h, layer.qkv).split((q_size, kv_size, kv_size), dim=-1)
            q, k = q.reshape(B, T, c.num_heads, c.head_dim), k.reshape(B, T, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q, k = ops.rms_norm(q, layer.q_norm, c.norm_eps), ops.rms_norm(k, layer.k_norm, c.norm_eps)
            table = self.rope_table_of(i)
            q, k = ops.rope(q, step, table=table), ops.rope(k, step, table=table)
            cache.write(i, k, v.reshape(B, T, c.num_kv_heads, c.head_dim), step.q_start, step.uniform_start)
            attn = ops.attention(q, cache.keys[i], cache.values[i], step, scale, layer.window)
            attn_out = ops.linear(attn.reshape(B, T, q_size), layer.out)
            if layer.attn_out_norm is not None:
                attn_out = ops.rms_norm(attn_out, layer.attn_out_norm, c.norm_eps)
            h = ops.add_rms_norm(x, attn_out, layer.mlp_norm, c.norm_eps)
            gate, up = ops.linear(h, layer.gate_up).chunk(2, dim=-1)
            pending = ops.linear(mlp_act(gate, up), layer.down)
            if layer.mlp_out_norm is not None:
                pending = ops.rms_norm(pending, layer.mlp_out_norm, c.norm_eps)
        return ops.add_rms_norm(x, pending, self.final_norm, c.norm_eps)
