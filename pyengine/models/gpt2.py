"""GPT-2: learned positions, LayerNorm, GELU (tanh), Conv1D weights stored [in, out]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.load.checkpoint import WeightReader
from pyengine.models.base import DecoderModel


@dataclass
class GPT2Layer:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    qkv: object
    out: object
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: object
    proj: object


class GPT2(DecoderModel):
    uses_rope = False

    def __init__(self, config, reader: WeightReader, backend, device="cpu"):
        super().__init__(config, backend, device)
        c = config
        H, I = c.hidden_size, c.intermediate_size
        reader = WeightReader(reader.weights, reader.folder, reader.dtype, prefixes=("transformer.", ""))

        def param(name, shape):
            return reader.take(name, shape).to(self.device)

        def conv1d(name, n_in, n_out):
            # HF's Conv1D keeps weight as [in, out]; our linears take [out, in].
            weight = reader.take_stored(name + ".weight", (n_in, n_out)).to(self.device)
            return backend.prepare_linear(weight.t().contiguous(), param(name + ".bias", (n_out,)), name=name)

        def norm(name):
            return param(name + ".weight", (H,)), param(name + ".bias", (H,))

        self.embed = param("wte.weight", (c.vocab_size, H))
        self.positions = param("wpe.weight", (c.max_context, H))
        self.layers = [
            GPT2Layer(ln_1=norm(f"h.{i}.ln_1"), qkv=conv1d(f"h.{i}.attn.c_attn", H, 3 * H),
                      out=conv1d(f"h.{i}.attn.c_proj", H, H), ln_2=norm(f"h.{i}.ln_2"),
                      fc=conv1d(f"h.{i}.mlp.c_fc", H, I), proj=conv1d(f"h.{i}.mlp.c_proj", I, H))
            for i in range(c.num_layers)
        ]
        self.final_norm = norm("ln_f")
        self.lm_head = backend.prepare_linear(self.embed, name="lm_head")  # GPT-2 always ties the output projection
        self.embed = backend.tied_embedding(self.lm_head, self.embed)

    def hidden_states(self, tokens, cache, step):
        c, ops = self.config, self.backend
        B, T = tokens.shape
        H, heads, D = c.hidden_size, c.num_heads, c.head_dim
        x = ops.add_position_embedding(ops.embedding(tokens, self.embed), self.positions, step)
        pending = None
        for i, layer in enumerate(self.layers):
            h = ops.layer_norm(x, *layer.ln_1, c.norm_eps) if pending is None else \
                ops.add_layer_norm(x, pending, *layer.ln_1, c.norm_eps)
            q, k, v = ops.linear(h, layer.qkv).reshape(B, T, 3, heads, D).unbind(2)
            cache.write(i, k, v, step.q_start, step.uniform_start)
            attn = ops.attention(q.contiguous(), cache.keys[i], cache.values[i], step, D ** -0.5)
            h = ops.add_layer_norm(x, ops.linear(attn.reshape(B, T, H), layer.out), *layer.ln_2, c.norm_eps)
            pending = ops.linear(ops.gelu(ops.linear(h, layer.fc)), layer.proj)
        return ops.add_layer_norm(x, pending, *self.final_norm, c.norm_eps)
