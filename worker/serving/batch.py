"""The inputs of one forward pass over some rows: their new tokens and positions, a 4D attention mask, and the
cache view that stores and gathers their keys and values in the pool (`worker.serving.kv_cache`).

A forward pass feeds each row its next tokens: a chunk of its prompt, or in a decode step the token it
sampled last. Rows with fewer new tokens are left-padded, so that every row's newest token is in the last
column and `logits_to_keep=1` gives each row's next-token logits. A padding token stores its key and value
in the padding slot, sits at position 0 and attends to its row's first token (a query that attends to nothing
gives NaN); its output is never read.

The gathered keys of a row hold its positions 0, 1, ... from column 0 on, as `generate` holds a single
sequence's, so a row computes what it would compute alone (on the CPU in fp32, bit for bit). The mask is the
caller's own, so transformers builds none: causal over each row's positions, the columns past a row's end
hidden, and those a sliding window leaves out (Phi-3-mini's 2047 tokens) hidden too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.serving.kv_cache import BLOCK_TOKENS, PADDING_SLOT, ZERO_BLOCK, KvPool, PooledCache
from worker.serving.transfer import to_device

PADDING_TOKEN = 0  # any id the embedding has


@dataclass(eq=False)
class CacheRow:
    """Where one sequence's keys and values live: its reserved blocks, and how many tokens they hold."""

    blocks: list[int]
    length: int = 0

    def slot(self, position: int) -> int:
        return self.blocks[position // BLOCK_TOKENS] * BLOCK_TOKENS + position % BLOCK_TOKENS


@dataclass(frozen=True)
class ForwardInputs:
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, 1, width, gathered columns], True where a query may attend
    cache: PooledCache


class RowBatch:
    """Rows that run forward passes together. Their slot table stays on the device while the rows do not
    change: a decode step only sends the few numbers of its new tokens."""

    def __init__(self, pool: KvPool, rows: list[CacheRow], sliding_window: int | None) -> None:
        self.rows = rows
        self._pool = pool
        self._sliding_window = sliding_window
        self._device = pool.storage.device
        widest = max(len(row.blocks) for row in rows)
        padded = [row.blocks + [ZERO_BLOCK] * (widest - len(row.blocks)) for row in rows]
        blocks = to_device(padded, self._device)
        offsets = torch.arange(BLOCK_TOKENS, device=self._device)
        # [rows, reserved tokens]: the slot of each position of each row (the zero block's past its blocks)
        self._slots = (blocks[:, :, None] * BLOCK_TOKENS + offsets).flatten(1)

    def feed(self, tokens: list[list[int]]) -> ForwardInputs:
        """The inputs of a forward pass that feeds row i the tokens `tokens[i]`, stored after the row's
        `length` tokens. The rows count them as stored from now on (a pass that fails fails its rows)."""
        rows, width = len(self.rows), max(len(new) for new in tokens)
        ids, positions, writes = [], [], []
        for row, new in zip(self.rows, tokens, strict=True):
            padding = width - len(new)
            stored = range(row.length, row.length + len(new))
            ids += [PADDING_TOKEN] * padding + new
            positions += [0] * padding + list(stored)
            writes += [PADDING_SLOT] * padding + [row.slot(position) for position in stored]
            row.length += len(new)
        # One copy to the device for everything the host decides.
        host = to_device(ids + positions + writes, self._device).view(3, rows, width)
        columns = max(row.length for row in self.rows)
        query = host[1, :, :, None]
        column = torch.arange(columns, device=self._device)
        mask = column <= query
        if self._sliding_window is not None:
            mask &= column > query - self._sliding_window
        cache = PooledCache(self._pool, host[2].flatten(), self._slots[:, :columns].flatten(), rows, columns)
        return ForwardInputs(host[0], host[1], mask[:, None], cache)
