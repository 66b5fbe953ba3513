"""Choosing each row's next token: greedy, or temperature and nucleus (top-p) sampling with a seed per row."""

from __future__ import annotations

import torch


class Sampler:
    """How one sequence picks its tokens. A seeded sampler draws from its own generator, so its choices do
    not depend on the other rows of the batch."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: torch.device) -> None:
        self.greedy = temperature == 0
        self.temperature = temperature
        self.top_p = top_p
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()  # a fresh random seed
            else:
                self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Draw a token from one row's logits [vocab]."""
        scores = logits.float() / self.temperature
        if self.top_p < 1:
            sorted_scores, order = scores.sort(descending=True)
            probabilities = sorted_scores.softmax(-1)
            # Keep the most likely tokens until their mass reaches top_p; the first one is always kept.
            outside = probabilities.cumsum(-1) - probabilities >= self.top_p
            kept = sorted_scores.masked_fill(outside, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, kept)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


def next_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """The next token of every row of `logits` [rows, vocab]: the argmax, except for rows that sample."""
    tokens = logits.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[row] = sampler.sample(logits[row])
    return tokens
