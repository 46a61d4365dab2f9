"""A preallocated KV cache with a length per sequence (ragged batches without padding the cache)."""
from __future__ import annotations

import torch


class KVCache:
    """keys/values: [layers, batch, kv_heads, capacity, head_dim]; one layer's slice is contiguous.

    Sequence b holds `lengths[b]` valid positions; the model writes new entries at positions
    lengths[b] .. lengths[b] + n_new - 1 and the engine advances `lengths` after each forward.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.capacity = capacity

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, uniform_start: int | None):
        """Store k, v ([batch, n_new, kv_heads, head_dim]) at positions start[b] + t."""
        n_new = k.shape[1]
        kc, vc = self.keys[layer], self.values[layer]
        if uniform_start is not None:  # prefill from the same position everywhere: one slice copy
            kc[:, :, uniform_start:uniform_start + n_new] = k.transpose(1, 2)
            vc[:, :, uniform_start:uniform_start + n_new] = v.transpose(1, 2)
        elif n_new == 1:  # decode: one position per sequence
            rows = torch.arange(k.shape[0], device=k.device)
            kc[rows, :, start.long()] = k[:, 0]
            vc[rows, :, start.long()] = v[:, 0]
        else:
            for b in range(k.shape[0]):
                s = int(start[b])
                kc[b, :, s:s + n_new] = k[b].transpose(0, 1)
                vc[b, :, s:s + n_new] = v[b].transpose(0, 1)
