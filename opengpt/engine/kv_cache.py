"""A contiguous KV cache: one preallocated (B, n_kv, max_len, hd) buffer per layer.

It implements the model's KVCacheView. Slot j holds position j, so attention masks are built from
positions alone. Two modes: growing (attention reads the written slots only, `length` counts them)
and static (attention reads the whole buffer, unwritten slots masked; shapes never change, so a
compiled decode step is traced once). The paged cache of the engine issue replaces this behind the
same interface.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device="cpu",
                 static: bool = False):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        # One tensor per layer (not views of one block): a compiled step then updates each in place
        # instead of copying a layer's whole buffer around the write.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.static = static
        self.packed = False
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions[0]  # the batch shares positions
        if self.static:
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
            n = self.key_length(positions)
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]  # (B, nkv, n, hd)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} were asked for")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, end, hd)

    @property
    def keys_all_valid(self) -> bool:
        return not self.static

    def key_length(self, positions: torch.Tensor) -> int:
        """Key slots attention reads for queries at `positions` (T,): the written ones in eager mode;
        under torch.compile a static cache returns every slot, so that the shape never changes."""
        if not self.static:
            return self.length + positions.shape[-1]
        if torch.compiler.is_compiling():
            return self.max_len
        return int(positions.max()) + 1

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.key_length(positions[0]), device=positions.device)

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
