"""The KV cache of an engine: one pool of fixed-size blocks, allocated once and written in place.

The pool holds the keys and values of every layer in one tensor, [layers, slots, 2, kv_heads, head_dim] in
the model's dtype (a token's key and value side by side: one write and one gather per layer), sized by a
token budget (`PHITUNE_INFERENCE_MAX_BATCH_TOKENS`), not by rows × context: it never grows, shrinks or moves
while the engine runs. A sequence reserves the blocks of its prompt and of all its completion tokens when it
is admitted (so it never runs out mid-generation) and gives them back when it ends.

Each forward pass writes its new keys and values into their slots (`index_copy_`) and hands attention its
rows' keys and values gathered into a [rows, kv_heads, longest row, head_dim] temporary, one layer at a time:
SDPA needs each row's keys in one strided tensor. A layer's temporary is freed when the layer is done, so an
engine holds the pool plus one layer's gather: rows × longest row tokens of one layer, at most
max_batch_size × context (for Phi-3-mini at 32 × 4096 in bf16: 1.5 GiB, next to a 48 GiB pool).

The columns past a row's end are masked out, but SDPA still multiplies their zero weight by what they hold,
so they must hold finite numbers: blocks are zeroed when a sequence reserves them (a NaN left by the sequence
before would poison the row), and the columns past a row's reservation read block 0, which is never written.
Block 1 takes the keys and values of padding tokens, which nothing reads. Neither is handed out.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedConfig

from worker.serving.transfer import to_device

BLOCK_TOKENS = 16
ZERO_BLOCK = 0
PADDING_SLOT = 1 * BLOCK_TOKENS  # in block 1
RESERVED_BLOCKS = 2
# Default budgets, when PHITUNE_INFERENCE_MAX_BATCH_TOKENS is unset: on a GPU, this share of the memory free
# once the model is loaded (the rest is for activations, the per-layer gather, adapters); on the CPU, a fixed
# size, enough for the tiny model at any load and for one full context of a 3.8B model in fp32.
CUDA_MEMORY_FRACTION = 0.8
CPU_POOL_BYTES = 4 * 2**30


def kv_shape(config: PreTrainedConfig) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's KV cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def bytes_per_token(config: PreTrainedConfig, dtype: torch.dtype) -> int:
    """The KV cache bytes of one token: a key and a value per layer."""
    layers, kv_heads, head_dim = kv_shape(config)
    return layers * 2 * kv_heads * head_dim * dtype.itemsize


def default_budget(
    config: PreTrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_rows: int,
    memory_fraction: float = CUDA_MEMORY_FRACTION,
) -> int:
    """The token budget of an engine whose budget is not configured: what fits in `memory_fraction` of the
    free GPU memory (CPU_POOL_BYTES on the CPU), and never more than `max_rows` full contexts."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pool_bytes = int(free * memory_fraction)
    else:
        pool_bytes = CPU_POOL_BYTES
    return min(max_rows * config.max_position_embeddings, pool_bytes // bytes_per_token(config, dtype))


class KvPool:
    """The preallocated keys and values of all sequences, and which blocks are free."""

    def __init__(
        self, config: PreTrainedConfig, *, tokens: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if tokens < BLOCK_TOKENS:
            raise ValueError(f"a KV cache budget of {tokens} tokens is less than one block ({BLOCK_TOKENS})")
        layers, kv_heads, head_dim = kv_shape(config)
        blocks = tokens // BLOCK_TOKENS + RESERVED_BLOCKS
        # Zeroed, not empty: masked columns are read (see the module docstring).
        self.storage = torch.zeros(
            layers, blocks * BLOCK_TOKENS, 2, kv_heads, head_dim, dtype=dtype, device=device
        )
        self.capacity = (blocks - RESERVED_BLOCKS) * BLOCK_TOKENS  # tokens that sequences can reserve
        self.layers = list(self.storage.unbind(0))  # each [slots, 2, kv_heads, head_dim]
        self._free = list(range(blocks - 1, RESERVED_BLOCKS - 1, -1))  # handed out from the end: lowest first
        self._blocks = self.storage.view(layers, blocks, BLOCK_TOKENS * 2 * kv_heads * head_dim)

    @property
    def bytes(self) -> int:
        """The size of the pool: allocated once, whatever the load."""
        return self.storage.numel() * self.storage.element_size()

    @property
    def reserved_tokens(self) -> int:
        return self.capacity - len(self._free) * BLOCK_TOKENS

    def reserve(self, tokens: int) -> list[int] | None:
        """The blocks for `tokens` tokens, or None while too few are free."""
        count = -(-tokens // BLOCK_TOKENS)
        if count > len(self._free):
            return None
        first = len(self._free) - count
        blocks = self._free[first:][::-1]  # in ascending order, when the free list is
        self._blocks.index_fill_(1, to_device(blocks, self.storage.device), 0)
        del self._free[first:]  # only once zeroed: a failed fill leaves the pool as it was
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free += blocks


class PooledCache(Cache):
    """The cache one forward pass hands the model: `update` writes the new keys and values of each layer into
    their slots and returns its rows' keys and values, gathered. Positions and the 4D attention mask come from
    the caller, so transformers never asks this cache for lengths (rows differ in length anyway)."""

    def __init__(
        self, pool: KvPool, write_slots: torch.Tensor, read_slots: torch.Tensor, rows: int, width: int
    ) -> None:
        super().__init__(layers=[])
        self._pool = pool
        self._write_slots = write_slots  # [rows * new tokens]: where each new token goes
        self._read_slots = read_slots  # [rows * width]: each row's slots, in position order
        self._rows = rows
        self._width = width

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values ([rows, kv_heads, new tokens, head_dim]); the rows' keys and values
        ([rows, kv_heads, width, head_dim]), the new ones included."""
        pool = self._pool.layers[layer_idx]
        new = torch.stack((key_states.transpose(1, 2), value_states.transpose(1, 2)), dim=2)
        pool.index_copy_(0, self._write_slots, new.flatten(0, 1))
        rows = pool.index_select(0, self._read_slots).unflatten(0, (self._rows, self._width))
        keys, values = rows.transpose(1, 3).unbind(2)  # from [rows, kv_heads, 2, width, head_dim]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("rows differ in length: pass position_ids and a 4D attention mask")
