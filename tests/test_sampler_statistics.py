"""The sampler's distribution, not just its support: chi-square goodness of fit over many seeded draws.

Each test draws N tokens from one seeded Sampler and compares the counts with the distribution the
settings define (softmax of logits / temperature, cut to the top-p nucleus and renormalised). A right
sampler passes with p > 1e-6 (the draws are seeded, so the outcome is fixed; the threshold says how
unlikely a failure of a right implementation would be). Each test also shows its power: the counts
are rejected (p < 1e-6) against what a typical wrong sampler draws from (temperature ignored, the
nucleus not cut or cut one token short).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from dllama.runtime.sampler import Sampler

LOGITS = np.array([0.0, 3.0, 1.0, 2.9, -1.0, 2.0], dtype=np.float32)
DRAWS = 8_000
P_RIGHT = 1e-6  # a right sampler fails with at most this probability


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def nucleus(probs: np.ndarray, top_p: float, extra: int = 0) -> np.ndarray:
    """The smallest set of most likely tokens whose mass reaches top_p (plus `extra` more), renormalised."""
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1 + extra
    cut = np.zeros_like(probs)
    cut[order[:keep]] = probs[order[:keep]]
    return cut / cut.sum()


def counts(sampler: Sampler, n: int = DRAWS) -> np.ndarray:
    return np.bincount([sampler(LOGITS) for _ in range(n)], minlength=len(LOGITS))


def p_value(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square p-value of the counts against a distribution; a token it cannot draw must never appear."""
    support = expected_probs > 0
    if observed[~support].any():
        return 0.0
    return float(chisquare(observed[support], expected_probs[support] * observed.sum()).pvalue)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_softmax_at_the_temperature(temperature):
    observed = counts(Sampler(temperature=temperature, seed=1234))
    assert p_value(observed, softmax(LOGITS, temperature)) > P_RIGHT
    # a sampler that ignored the temperature (or applied it twice) would be caught by these counts
    for wrong in {1.0, temperature ** 2} - {temperature}:
        assert p_value(observed, softmax(LOGITS, wrong)) < P_RIGHT


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_draws_follow_the_renormalised_nucleus(top_p):
    probs = softmax(LOGITS, 0.7)
    observed = counts(Sampler(temperature=0.7, top_p=top_p, seed=99))
    assert p_value(observed, nucleus(probs, top_p)) > P_RIGHT
    assert p_value(observed, probs) < P_RIGHT  # no cut at all
    assert p_value(observed, nucleus(probs, top_p, extra=1)) < P_RIGHT  # one token too many


def test_seeds_give_independent_streams_and_the_same_seed_the_same_stream():
    first = [Sampler(temperature=1.0, seed=7)(LOGITS) for _ in range(1)]
    stream = Sampler(temperature=1.0, seed=7)
    again = Sampler(temperature=1.0, seed=7)
    assert [stream(LOGITS) for _ in range(200)] == [again(LOGITS) for _ in range(200)]
    assert first[0] == Sampler(temperature=1.0, seed=7)(LOGITS)
    # first draws over many seeds follow the distribution too (seeds are not correlated with the token)
    firsts = np.bincount([Sampler(temperature=1.0, seed=s)(LOGITS) for s in range(DRAWS // 4)],
                         minlength=len(LOGITS))
    assert p_value(firsts, softmax(LOGITS, 1.0)) > P_RIGHT


def test_greedy_is_the_argmax_whatever_the_seed():
    assert {Sampler(temperature=0, seed=s)(LOGITS) for s in range(50)} == {int(np.argmax(LOGITS))}
