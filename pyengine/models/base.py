"""What every architecture shares: rotary tables, the per-call Step, the final projection, and the
choice between a C++ decode step (one call per token, recorded from hidden_states: pyengine.runtime.plan)
and the op-by-op path."""
from __future__ import annotations

import os
import warnings

import torch

from pyengine.kernels.backends import Step
from pyengine.load.config import ModelConfig, rope_inverse_frequencies
from pyengine.runtime.kv_cache import KVCache


class DecoderModel:
    config: ModelConfig
    uses_rope = True

    def __init__(self, config: ModelConfig, backend, device):
        self.config = config
        self.backend = backend
        self.device = torch.device(device)
        # Rotary tables by name: name -> (inverse frequencies, factor on cos/sin); built as steps need them.
        self._rope_specs = {name: (inv_freq.to(self.device), factor)
                            for name, (inv_freq, factor) in self.rope_specs().items()} if self.uses_rope else {}
        self._rope_cache = {}  # name -> (cos, sin)
        # Decode steps go through the backend's C++ replay of this model's recorded step when it has
        # one (built on first use); PYENGINE_CPP_DECODE=0 keeps them on the op-by-op path.
        self.cpp_decode = os.environ.get("PYENGINE_CPP_DECODE", "1") != "0"
        self._decoder = None

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, dtype, self.device)

    def make_step(self, n_new: int, cache: KVCache, lengths: torch.Tensor | None = None) -> Step:
        """n_new tokens per row; `lengths` ([batch] int32) says how many of them are real in each row
        (a right-padded batch of prompts), default all."""
        q_start = cache.lengths.clone()
        positions = q_start.long()[:, None] + torch.arange(n_new, device=self.device)
        if int(positions.max()) >= cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; this step needs {int(positions.max()) + 1}")
        first = int(q_start[0])
        uniform = first if bool((q_start == first).all()) else None
        kv_len = q_start + (n_new if lengths is None else lengths.to(q_start.device, torch.int32))
        return Step(q_start=q_start, kv_len=kv_len, positions=positions, uniform_start=uniform,
                    rope_tables=self.rope_tables(int(positions.max()) + 1))

    def rope_tables(self, needed: int) -> dict:
        """The rotary tables a step's rope ops pick by name, each (cos, sin) [positions, head_dim / 2]
        with at least `needed` rows: "default" and any others rope_specs names (Gemma 3's "local"),
        none without rotary embedding."""
        return {name: self._rope_tables(needed, name) for name in self._rope_specs}

    def rope_specs(self) -> dict:
        """The rotary tables this model's layers use: name -> (inverse frequencies, factor on cos and
        sin). "default" is the config's rope_theta and scaling."""
        return {"default": (rope_inverse_frequencies(self.config), 1.0)}

    def _rope_tables(self, needed: int, name: str = "default"):
        """cos/sin of every position's rotation angles, [positions, head_dim / 2], at least `needed` rows."""
        cos, sin = self._rope_cache.get(name, (torch.empty(0), None))
        if cos.shape[0] < needed:  # grow by doubling, up to the context length
            size = min(max(needed, 2 * cos.shape[0], 256), max(self.config.max_context, needed))
            inv_freq, factor = self._rope_specs[name]
            angles = torch.outer(torch.arange(size, device=self.device).float(), inv_freq)
            cos, sin = angles.cos(), angles.sin()
            if factor != 1.0:
                cos, sin = cos * factor, sin * factor
            self._rope_cache[name] = cos, sin
        return self._rope_cache[name]

    def forward(self, tokens: torch.Tensor, cache: KVCache, logits_at: torch.Tensor | None = None,
                n_new: torch.Tensor | None = None) -> torch.Tensor:
        """Run `tokens` ([batch, n_new]) through the model, appending to `cache`.

        Returns logits [batch, n_new, vocab], or [batch, vocab] at index logits_at[b] of each row
        (prefill needs only each sequence's last real token, which saves the large vocab projection).
        """
        if tokens.shape[1] == 1 and logits_at is None and n_new is None and self._cpp_decoder() is not None:
            return self._decode_step(tokens, cache)
        step = self.make_step(tokens.shape[1], cache, n_new)
        hidden = self.hidden_states(tokens, cache, step)
        if logits_at is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_at]
        return self.logits(hidden)

    def hidden_states(self, tokens, cache, step) -> torch.Tensor:
        """The architecture, written once with the backend's ops: tokens [B, T] through the layers to
        the final norm's output [B, T, hidden]. The C++ decode step is recorded from this code."""
        raise NotImplementedError

    def logits(self, hidden) -> torch.Tensor:
        """The output projection of the final hidden states, soft-capped where the config says so
        (Gemma's final_logit_softcapping)."""
        logits = self.backend.linear(hidden, self.lm_head)
        cap = self.config.final_logit_softcap
        return logits if cap is None else self.backend.softcap(logits, cap)

    def decode_greedy(self, tokens: torch.Tensor, cache: KVCache, advance: torch.Tensor) -> torch.Tensor | None:
        """A greedy decode step in one C++ call: tokens [batch] int64 through the model, each row's
        argmax out ([batch] int64, as `sample` would choose it), then cache.lengths += advance
        ([batch] int32). None where no C++ decoder runs: then forward() and sample()."""
        if self._cpp_decoder() is None:
            return None
        next_ids = torch.empty(tokens.shape[0], dtype=torch.long)
        self._decode_step(tokens, cache, next_tokens=next_ids, advance=advance)
        return next_ids

    def _cpp_decoder(self):
        """The backend's C++ decode step for this model, built on first use; None where there is none
        (then decode runs op by op through hidden_states)."""
        if not self.cpp_decode:
            return None
        if self._decoder is None:
            from pyengine.runtime.plan import PlanRecordingError

            try:
                self._decoder = self.backend.make_cpp_decoder(self) or False  # False: none here
            except PlanRecordingError as e:
                warnings.warn(f"{type(self).__name__}: decoding op by op, the C++ decode step could not be "
                              f"recorded: {e}", stacklevel=2)
                self._decoder = False
        return self._decoder or None

    def _decode_step(self, tokens, cache, **tail):
        """One new token per sequence through the C++ decode step, written at cache.lengths[b]; logits
        [batch, 1, vocab]. tail: the step's next_tokens / advance options (decode_greedy)."""
        B = tokens.shape[0]
        logits = torch.empty(B, 1, self.config.vocab_size)
        # Tables covering every position the cache can hold: no per-step max().
        self._decoder.step(tokens.reshape(B).long(), cache, self.rope_tables(cache.capacity), logits.view(B, -1),
                           **tail)
        return logits
