"""Next-token choice: greedy, temperature, top-k, top-p and seeds."""

from __future__ import annotations

import pytest
import torch

from phalanx_serve.sampling import SamplingParams, filter_logits, sample_next_tokens

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])


def test_greedy_rows_take_the_argmax_and_sampled_rows_use_their_generator() -> None:
    logits = LOGITS.repeat(2, 1)
    params = [SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=1, seed=5)]
    gens = [p.make_generator() for p in params]
    assert gens[0] is None
    chosen = sample_next_tokens(logits, params, gens)
    assert chosen[0] == 0
    assert 0 <= chosen[1] < 5


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        pytest.param(SamplingParams(1, top_k=2), [0, 1], id="top-k-2"),
        pytest.param(SamplingParams(1, top_k=1), [0], id="top-k-1"),
        pytest.param(SamplingParams(1, top_p=0.5), [0], id="top-p-keeps-most-likely"),
        pytest.param(SamplingParams(1, top_p=0.8), [0, 1], id="top-p-0.8"),
        pytest.param(SamplingParams(1, top_k=-1, top_p=1.0), [0, 1, 2, 3, 4], id="no-limits"),
    ],
)
def test_filtering_keeps_the_expected_tokens(params: SamplingParams, kept: list[int]) -> None:
    filtered = filter_logits(LOGITS, [params])[0]
    assert torch.isfinite(filtered).nonzero().flatten().tolist() == kept


def test_same_seed_same_tokens_regardless_of_batch_neighbours() -> None:
    def draw(batch: int) -> list[int]:
        params = [SamplingParams(1, temperature=1.5, seed=42)] + [SamplingParams(1)] * (batch - 1)
        gens = [p.make_generator() for p in params]
        logits = torch.zeros(batch, 50)
        return [sample_next_tokens(logits, params, gens)[0] for _ in range(20)]

    assert draw(1) == draw(4)


def test_tiny_temperature_is_greedy_rather_than_overflowing() -> None:
    params = [SamplingParams(1, temperature=1e-300)]
    assert params[0].greedy
    assert sample_next_tokens(LOGITS, params, [None]) == [0]
