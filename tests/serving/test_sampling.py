"""Batched sampling: the right distribution; a seeded row's tokens independent of the rest of the batch."""

from __future__ import annotations

import pytest
import torch

from worker.serving.sampling import Sampler, next_tokens

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])


def expected_distribution(temperature: float, top_p: float) -> torch.Tensor:
    probabilities = (LOGITS / temperature).softmax(-1)
    ordered, order = probabilities.sort(descending=True)
    kept = ordered * (ordered.cumsum(0) - ordered < top_p)
    return torch.zeros_like(kept).scatter(0, order, kept / kept.sum())


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.3, 0.8)])
def test_sampled_tokens_follow_the_temperature_and_top_p(temperature: float, top_p: float) -> None:
    draws = 20_000  # one row per seed, all in one batch
    samplers = [Sampler(temperature, top_p, seed) for seed in range(draws)]
    tokens = next_tokens(LOGITS.expand(draws, -1), samplers, [0] * draws)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)) / draws
    expected = expected_distribution(temperature, top_p)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)
    assert frequencies[expected == 0].sum() == 0  # outside the nucleus: never


def test_a_seeded_row_draws_the_same_tokens_wherever_it_sits() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    row = logits[2:3]

    def draw(batch: torch.Tensor, position: int) -> list[int]:
        tokens = []
        for step in range(20):
            samplers = [Sampler(0.0 if i % 2 else 1.0, 0.9, seed=i + 100) for i in range(len(batch))]
            samplers[position] = Sampler(1.0, 0.9, seed=7)
            tokens.append(next_tokens(batch, samplers, [step] * len(batch))[position])
        return tokens

    alone = draw(row, 0)
    assert draw(torch.cat([logits[:2], row, logits[3:]]), 2) == alone
    assert draw(torch.cat([row, logits.flip(0)]), 0) == alone
    assert len(set(alone)) > 1  # it does sample


def test_greedy_rows_take_the_argmax_next_to_sampling_rows() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    samplers = [Sampler(0.0 if row % 2 else 2.0, 1.0, seed=row) for row in range(6)]
    tokens = next_tokens(logits, samplers, [3] * 6)
    assert tokens[1::2] == logits.argmax(-1)[1::2].tolist()
