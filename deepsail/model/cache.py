"""Paged KV cache.

Every layer's cache entries live in one pool of fixed-size blocks (`KVPool`); a sequence owns an ordered list of
block ids (a row of `block_table`) and a length. `KVCache` is the per-forward view the model reads: which blocks each
batch row owns and how many tokens it already has. Plain generation gets contiguous blocks from `new_cache`; the
continuous-batching engine hands out, frees, shares (prefix reuse) and preempts blocks itself — the model never
cares, it only reads the table.

For MLA a slot holds the normalised latent c_kv and the shared rope key ([kv_lora_rank + qk_rope_head_dim] numbers,
DeepSeek-V2's 93% smaller cache); for GQA it holds K and V for the kv heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepsail.model.config import ModelConfig


class KVPool:
    """Storage for `num_blocks * block_size` token slots in every layer (main layers, then MTP layers)."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        include_mtp: bool = True,
    ) -> None:
        """`include_mtp=False` leaves out the MTP layers' slots, for engines that never draft with them."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KVPool needs positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
        slots = num_blocks * block_size
        if config.attention_type == "mla":
            width = (config.kv_lora_rank + config.qk_rope_head_dim,)
            self.k = [torch.zeros(slots, *width, dtype=dtype, device=device) for _ in range(self.num_layers)]
            self.v: list[torch.Tensor] | None = None
        else:
            shape = (slots, config.num_key_value_heads, config.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        # Hybrid sparse attention's pooled blocks (model/sparse_attention.py), so a decode step reads L/compress_block
        # of them instead of re-pooling the whole history: block i's pooled key and value sit at its last token's
        # slot // stride. With one of block_size and compress_block dividing the other, that index is unique, and a
        # block lies in the pages up to its last token's: pages shared for a common prefix share its entries too.
        # Otherwise (e.g. pages of 48 tokens, blocks of 32) there is no store and decode re-pools (still exact).
        self.kc: list[torch.Tensor] | None = None
        self.vc: list[torch.Tensor] | None = None
        self.compress_stride = 0
        c = config.compress_block
        if config.sparse_attention == "hybrid" and (block_size % c == 0 or c % block_size == 0):
            self.compress_stride = min(c, block_size)
            # + 1 scratch row, where a decode step's candidate block that does not complete writes (_new_blocks)
            shape = (slots // self.compress_stride + 1, *self.k[0].shape[1:])
            self.kc = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
            self.vc = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]

    def stores(self) -> list[torch.Tensor]:
        """Every tensor of the pool (all layers), each with one row per slot or per `compress_stride` slots."""
        return self.k + (self.v or []) + (self.kc or []) + (self.vc or [])

    @property
    def bytes_per_token(self) -> int:
        per_layer = self.k[0][0].numel() * (1 if self.v is None else 2)
        if self.kc is not None:
            per_layer += 2 * self.kc[0][0].numel() / self.compress_stride
        return int(per_layer * self.num_layers * self.k[0].element_size())


@dataclass
class KVCache:
    """What one forward pass reads: batch row b owns blocks `block_table[b]` and has `lens[b]` cached tokens.

    The model appends each row's new tokens and advances `lens` in place.
    """

    pool: KVPool
    block_table: torch.Tensor  # [B, max_blocks] int64 block ids (-1 = none)
    lens: torch.Tensor  # [B] int64

    @property
    def capacity(self) -> torch.Tensor:
        return (self.block_table >= 0).sum(1) * self.pool.block_size

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Pool slot of each (row, position); positions [B, T] -> [B, T]. Positions past a row's blocks map to -1."""
        bs = self.pool.block_size
        block_idx = (positions // bs).clamp(max=self.block_table.shape[1] - 1)
        blocks = self.block_table.gather(1, block_idx)
        inside = (positions // bs < self.block_table.shape[1]) & (blocks >= 0)
        return torch.where(inside, blocks * bs + positions % bs, -1)


def new_cache(
    config: ModelConfig,
    batch_size: int,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    block_size: int = 16,
) -> KVCache:
    """A cache for plain batched generation: each row gets its own contiguous run of blocks."""
    blocks_per_row = -(-max_seq_len // block_size)
    pool = KVPool(config, batch_size * blocks_per_row, block_size, dtype, device)
    table = torch.arange(batch_size * blocks_per_row, device=device).view(batch_size, blocks_per_row)
    return KVCache(pool, table, torch.zeros(batch_size, dtype=torch.long, device=device))
