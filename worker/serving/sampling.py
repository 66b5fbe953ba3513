"""Choosing every row's next token in one pass over the batch: greedy rows take the argmax, the others sample
with temperature and nucleus (top-p), all rows at once.

A sampling row draws each token by inverse transform over its sorted probabilities, with one uniform number
that depends only on its seed and the token's index (`Sampler.uniform`, SplitMix64 on the host): the same seed
gives the same completion whatever else is in the batch, with no per-row generator and no per-row device work.
`next_tokens` ends with the step's one device-to-host copy, the list of next tokens.
"""

from __future__ import annotations

import secrets

import torch

from worker.serving.transfer import to_device

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


class Sampler:
    """How one sequence picks its tokens. Without a seed, a random one is drawn."""

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.greedy = temperature == 0
        self.temperature = temperature
        self.top_p = top_p
        self._key = _mix((secrets.randbits(64) if seed is None else seed) & _MASK64)

    def uniform(self, step: int) -> float:
        """The uniform number in [0, 1) that draws token number `step` (0 for the first)."""
        return (_mix((self._key + (step + 1) * _GOLDEN_GAMMA) & _MASK64) >> 11) / 2**53


def next_tokens(logits: torch.Tensor, samplers: list[Sampler], steps: list[int]) -> list[int]:
    """The next token of every row of `logits` [rows, vocab], row i drawing its token number `steps[i]`."""
    tokens = logits.argmax(dim=-1)
    sampling = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if sampling:
        rows = to_device(sampling, logits.device)
        parameters = [_parameters(samplers[row], steps[row]) for row in sampling]
        temperature, top_p, uniform = to_device(parameters, logits.device, torch.float32).unbind(1)
        drawn = _sample(logits.index_select(0, rows).float(), temperature, top_p, uniform)
        tokens.index_copy_(0, rows, drawn)
    return tokens.tolist()


def _parameters(sampler: Sampler, step: int) -> tuple[float, float, float]:
    """Temperature, top_p (top_p >= 1 keeps every token) and uniform number of one row's draw."""
    return sampler.temperature, sampler.top_p if sampler.top_p < 1 else float("inf"), sampler.uniform(step)


def _sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Draw a token from each row of `logits` [rows, vocab] shaped by its temperature and top_p."""
    sorted_scores, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    probabilities = sorted_scores.softmax(-1)
    # Keep the most likely tokens until their mass reaches top_p; the first one is always kept.
    kept = probabilities.cumsum(-1) - probabilities < top_p[:, None]
    cumulative = probabilities.masked_fill(~kept, 0).cumsum(-1)
    # The first token whose cumulative mass exceeds uniform × the kept mass; never past the kept ones (a
    # uniform that rounds to 1 would fall off the end).
    drawn = torch.searchsorted(cumulative, uniform[:, None] * cumulative[:, -1:], right=True)
    drawn = torch.minimum(drawn, kept.sum(-1, keepdim=True) - 1)
    return order.gather(1, drawn).squeeze(1)
