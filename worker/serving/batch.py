"""The tensors of the sequences that decode together: a left-padded KV cache and what each row needs next.

Rows are right-aligned: every row's newest token sits in the last column, so one decode step appends one
column for all rows. A row's padding columns are masked out of attention, and its position ids count only its
own tokens, so each row computes what it would compute alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class RunningBatch:
    """The KV cache, attention mask, next positions and next input tokens of the running rows."""

    def __init__(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        self.cache = cache
        self.mask = mask  # [rows, columns]: 1 where the cache holds a real token of the row
        self.positions = positions  # [rows]: the position id of each row's next input token
        self.tokens = tokens  # [rows]: each row's next input token, the last one sampled

    @staticmethod
    def prompt_inputs(
        prompts: list[list[int]], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids of left-padded prompts, for a prefill forward pass."""
        width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), positions.to(device)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids of the next decode step."""
        mask = F.pad(self.mask, (0, 1), value=1)
        return self.tokens.unsqueeze(1), mask, self.positions.unsqueeze(1)

    def advance(self, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record a decode step that ran with `mask` and sampled `tokens`."""
        self.mask = mask
        self.positions = self.positions + 1
        self.tokens = tokens

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), and drop the columns that are padding in every kept row."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())  # the first column any kept row uses
        layers = [
            (keys.index_select(0, index)[:, :, first:], values.index_select(0, index)[:, :, first:])
            for keys, values, _ in self.cache
        ]
        self.cache = DynamicCache(layers)
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        self.tokens = self.tokens.index_select(0, index)

    def extend(self, other: RunningBatch) -> None:
        """Append the rows of `other` after these, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (_stack_rows(keys, other_keys, width), _stack_rows(values, other_values, width))
            for (keys, values, _), (other_keys, other_values, _) in zip(self.cache, other.cache, strict=True)
        ]
        self.cache = DynamicCache(layers)
        self.mask = _stack_rows(self.mask, other.mask, width)
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])

    def __len__(self) -> int:
        return self.mask.shape[0]


def _stack_rows(first: torch.Tensor, second: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([_pad_left(first, width), _pad_left(second, width)])


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (-2 of KV tensors [rows, heads, seq, dim], -1 of masks) to `width`."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = (missing, 0) if dim == -1 else (0, 0, missing, 0)
    return F.pad(tensor, padding)
