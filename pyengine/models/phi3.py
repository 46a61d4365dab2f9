"""Phi-3: Llama whose checkpoint stores q/k/v as one qkv_proj ([q; k; v] rows) and gate/up as one
gate_up_proj ([gate; up]) (our own fused layout, loaded as is), a sliding window on every layer where
the config sets one, and LongRoPE where rope_scaling says "longrope"."""
import torch

from pyengine.load.config import rope_inverse_frequencies
from pyengine.models.llama import Llama


class Phi3(Llama):
    """LongRoPE, per forward call and per sequence: a sequence whose length after this call (its cached
    tokens plus this call's) exceeds original_max_position_embeddings rotates this call's queries and
    keys with the long factors, else with the short ones; cos and sin are multiplied by the attention
    factor either way. That is transformers' (5.25) Phi-3 forward, which picks by max(position_ids) + 1
    per call: identical for one sequence; in a batch transformers uses the longest row's choice for all
    rows, we each row's own (so a request's tokens do not depend on the requests it is batched with).
    Keys already in the cache keep the rotation they were written with. transformers' generate() also
    drops its cache once, at the first step whose length crosses original_max_position_embeddings, and
    recomputes the whole sequence with the long factors; we do not, so greedy tokens generated after a
    sequence crosses that length during decode can differ from transformers' generate() (a prompt
    already past it, or a sequence that stays under it, matches)."""

    def load_qkv(self, p):
        c = self.config
        rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        return self.matrix(p + "self_attn.qkv_proj.weight", (rows, c.hidden_size)), None

    def load_gate_up(self, p):
        c = self.config
        return self.matrix(p + "mlp.gate_up_proj.weight", (2 * c.intermediate_size, c.hidden_size)), None

    def _longrope(self):
        s = self.config.rope_scaling
        return s if s is not None and s.get("rope_type") == "longrope" else None

    def rope_specs(self):
        s = self._longrope()
        if s is None:
            return super().rope_specs()
        factor = s["attention_factor"]
        return {"default": (rope_inverse_frequencies(self.config), factor),
                "long": (rope_inverse_frequencies(self.config, long=True), factor)}

    def _cpp_decoder(self):
        # The recorded C++ step rotates every row by one table; LongRoPE picks each row's table by its
        # length at every step, so it decodes op by op.
        return None if self._longrope() else super()._cpp_decoder()

    def make_step(self, n_new, cache, lengths=None):
        step = super().make_step(n_new, cache, lengths)
        s = self._longrope()
        if s is None:
            return step
        short_cos, short_sin = step.rope_tables["default"]
        long_cos, long_sin = step.rope_tables.pop("long")
        rows = min(short_cos.shape[0], long_cos.shape[0])
        if getattr(self, "_stacked_rows", None) != rows:  # [short; long], rebuilt only when the tables grow
            self._stacked = (torch.cat([short_cos[:rows], long_cos[:rows]]), torch.cat([short_sin[:rows], long_sin[:rows]]))
            self._stacked_rows = rows
        is_long = step.kv_len.to(step.positions.device) > s["original_max_position_embeddings"]
        step.rope_tables["default"] = (*self._stacked, step.positions + rows * is_long.long()[:, None])
        return step
