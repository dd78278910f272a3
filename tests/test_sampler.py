"""The sampler's arithmetic, checked against the formulas written out independently here:
top_k, top_p, min_p, the penalties, logit_bias and logprobs."""
from __future__ import annotations

import numpy as np
import pytest

from dllama.runtime import sampler as sampler_module
from dllama.runtime.engine import EngineError
from dllama.runtime.sampler import Sampler, Sampling, log_softmax

VOCAB = 1000


def random_logits(seed: int, n: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def primed(sampling: Sampling, prompt: list[int], answer: list[int]) -> Sampler:
    """A sampler that has seen `prompt` and then chosen `answer`."""
    s = Sampler(sampling)
    s.begin(prompt)
    s.context += answer
    return s


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy(seed):
    logits = random_logits(seed)
    for draw in range(20):
        assert Sampler(Sampling(temperature=1.5, top_k=1, seed=draw))(logits) == int(np.argmax(logits))


def test_top_k_keeps_exactly_the_k_most_likely():
    logits = random_logits(1)
    ids, probs = Sampler(Sampling(temperature=0.7, top_k=10)).distribution(logits.astype(np.float64))
    assert set(ids) == set(np.argsort(-logits)[:10])
    expected = softmax(logits[ids].astype(np.float64) / 0.7)
    assert np.allclose(probs, expected, rtol=1e-12)


def test_min_p_excludes_tokens_below_min_p_times_the_best():
    logits = random_logits(2)
    for min_p in (0.01, 0.1, 0.5):
        ids, probs = Sampler(Sampling(temperature=0.8, min_p=min_p)).distribution(logits.astype(np.float64))
        p = softmax(logits.astype(np.float64) / 0.8)
        assert set(ids) == set(np.flatnonzero(p >= min_p * p.max()))
        assert np.allclose(probs, p[ids] / p[ids].sum(), rtol=1e-12)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = random_logits(3)
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")
    for top_p in (0.3, 0.9, 0.999):
        ids, _ = Sampler(Sampling(top_p=top_p)).distribution(logits.astype(np.float64))
        n = int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1
        assert list(ids) == list(order[:n])


def test_top_p_on_a_large_vocabulary_sorts_only_what_it_needs_and_agrees_with_a_full_sort(monkeypatch):
    logits = random_logits(4, n=50_000)
    for top_p in (0.5, 0.95):   # 0.95 of a flat-ish distribution needs more than the first 512 tokens
        fast = Sampler(Sampling(top_p=top_p)).distribution(logits.astype(np.float64))
        monkeypatch.setattr(sampler_module, "TOP_P_PREFIX", 10 ** 9)
        full = Sampler(Sampling(top_p=top_p)).distribution(logits.astype(np.float64))
        monkeypatch.undo()
        assert np.array_equal(fast[0], full[0]) and np.array_equal(fast[1], full[1])


def test_draws_follow_the_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    s = Sampler(Sampling(temperature=1.0, repeat_penalty=1.0, seed=11))
    draws = np.bincount([s.choose(logits) for _ in range(4000)], minlength=5) / 4000
    # seeded, so the same draws every run; 0.03 is 3.8 standard errors of a frequency near 0.5 over 4000 draws.
    # A sampler that ignores the temperature or the nucleus: the chi-square tests in test_sampler_statistics.py
    assert np.abs(draws - softmax(logits)).max() < 0.03


def test_presence_and_frequency_penalties_follow_openais_formula_over_the_answer():
    logits = random_logits(5)
    prompt, answer = [1, 2, 3, 3], [3, 7, 7, 7, 9]
    s = primed(Sampling(presence_penalty=0.4, frequency_penalty=0.25, repeat_penalty=1.0), prompt, answer)
    expected = logits.astype(np.float64)
    for token, count in {3: 1, 7: 3, 9: 1}.items():   # the prompt's tokens are not counted
        expected[token] -= count * 0.25 + 0.4
    assert np.array_equal(s.adjusted(logits), expected)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_of_the_last_n_tokens():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 4.0, 3.0], dtype=np.float32)
    s = primed(Sampling(repeat_penalty=2.0, repeat_last_n=3), prompt=[5, 0], answer=[1, 2])  # window: 0, 1, 2
    assert s.adjusted(logits).tolist() == [1.0, -4.0, 0.5, -1.0, 4.0, 3.0]


def test_repeat_penalty_defaults_on_when_sampling_and_off_when_greedy():
    assert Sampling(temperature=0.8).effective_repeat_penalty == sampler_module.DEFAULT_REPEAT_PENALTY
    assert Sampling(temperature=0.0).effective_repeat_penalty == 1.0
    logits = random_logits(6)
    best = int(np.argmax(logits))
    greedy = primed(Sampling(temperature=0.0), [best] * 10, [best] * 10)
    assert greedy.choose(logits) == best and not greedy.adjusts_logits   # greedy stays the plain argmax
    assert primed(Sampling(temperature=0.0, repeat_penalty=1e6), [best], []).choose(logits) != best


def test_logit_bias_adds_and_minus_100_bans():
    logits = random_logits(7)
    best = int(np.argmax(logits))
    s = Sampler(Sampling(temperature=1.0, logit_bias={best: -100.0, 5: 3.5}, repeat_penalty=1.0, seed=0))
    z = s.adjusted(logits)
    assert z[best] == -np.inf and z[5] == np.float64(logits[5]) + 3.5
    assert best not in {s.choose(logits) for _ in range(300)}
    assert Sampler(Sampling(temperature=0.0, logit_bias={best: -100.0})).choose(logits) != best
    with pytest.raises(EngineError, match="bans every token"):
        Sampler(Sampling(temperature=0.0, logit_bias={i: -100.0 for i in range(VOCAB)})).choose(logits)


def test_logprobs_are_the_log_softmax_of_the_engines_logits():
    logits = random_logits(8)
    s = Sampler(Sampling(temperature=1.0, top_k=5, repeat_penalty=1.3, presence_penalty=1.0, seed=3,
                         top_logprobs=4))
    s.begin([10, 11])
    token = s(logits)
    reference = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))  # penalties don't count
    assert s.last_logprob.token == token
    assert s.last_logprob.logprob == pytest.approx(reference[token], abs=1e-12)
    assert [t for t, _ in s.last_logprob.top] == list(np.argsort(-reference)[:4])
    assert [lp for _, lp in s.last_logprob.top] == pytest.approx(np.sort(reference)[::-1][:4], abs=1e-12)
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad, fragment", [
    (Sampling(temperature=float("nan")), "temperature"),
    (Sampling(top_p=float("nan")), "top_p"),
    (Sampling(min_p=-0.1), "min_p"),
    (Sampling(top_k=-1), "top_k"),
    (Sampling(repeat_penalty=0.0), "repeat_penalty"),
    (Sampling(seed=-1), "seed"),
])
def test_bad_settings_are_refused_with_the_setting_named(bad, fragment):
    with pytest.raises(EngineError, match=fragment):
        Sampler(bad)


def test_an_allowed_mask_removes_tokens_before_anything_else():
    logits = random_logits(9)
    allowed = np.zeros(VOCAB, dtype=bool)
    allowed[[3, 50, 700]] = True
    assert Sampler(Sampling(temperature=0.0))(logits, allowed) == [3, 50, 700][int(np.argmax(logits[[3, 50, 700]]))]
    s = Sampler(Sampling(temperature=2.0, top_p=0.99, min_p=0.0, seed=1, top_logprobs=0))
    assert {s(logits, allowed) for _ in range(200)} <= {3, 50, 700}
    assert s.last_logprob.logprob == pytest.approx(log_softmax(logits)[s.last_logprob.token])  # raw logits


# -- the edges a mutation run found unchecked (docs/TESTING.md, "Mutation testing")

@pytest.mark.parametrize("fields", [
    dict(temperature=float("inf")), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.5), dict(repeat_last_n=-1),
    dict(presence_penalty=-2.5), dict(presence_penalty=2.5), dict(frequency_penalty=-2.5),
    dict(frequency_penalty=2.5), dict(top_logprobs=21),
])
def test_settings_just_outside_their_range_are_refused(fields):
    with pytest.raises(EngineError, match=next(iter(fields))):
        Sampler(Sampling(**fields))


@pytest.mark.parametrize("fields", [
    dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0), dict(repeat_last_n=0), dict(presence_penalty=-2.0),
    dict(presence_penalty=2.0), dict(frequency_penalty=-2.0), dict(frequency_penalty=2.0), dict(top_logprobs=20),
])
def test_settings_at_the_ends_of_their_range_are_accepted(fields):
    Sampler(Sampling(temperature=1.0, seed=0, **fields))(random_logits(10))


def test_a_sampling_and_its_fields_together_are_refused():
    with pytest.raises(TypeError, match="^give a Sampling or its fields, not both$"):
        Sampler(Sampling(), temperature=1.0)


def test_fields_without_a_temperature_are_greedy():
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[123] = 0.5   # a flat distribution: a sampler would draw anything
    assert {Sampler(seed=seed, top_p=0.9)(logits) for seed in range(20)} == {123}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_infinite_or_nan_logits_are_refused_with_the_fix(temperature, bad):
    logits = random_logits(11)
    logits[17] = bad
    with pytest.raises(sampler_module.NaNLogits, match=r"^the model computed NaN or infinite logits: its weights hold "
                       r"inf or NaN values \(a corrupt \.m\?\); check it with dllama-validate and convert it again$"):
        Sampler(Sampling(temperature=temperature, seed=0))(logits)


def test_greedy_with_a_logit_bias_takes_the_argmax_of_the_adjusted_logits():
    logits = random_logits(12)
    assert int(np.argmax(logits)) != 400
    assert Sampler(Sampling(temperature=0.0, logit_bias={400: 50.0}))(logits) == 400
    with pytest.raises(EngineError, match="^logit_bias bans every token of the vocabulary: ban fewer$"):
        Sampler(Sampling(temperature=1.0, logit_bias={i: -100.0 for i in range(VOCAB)}))(logits)


def test_low_temperatures_on_large_logits_do_not_overflow():
    # engine logits reach ~30; at temperature 0.05 that is 600, and exp(600 + 600) is inf
    logits = np.array([30.0, 29.0, -30.0], dtype=np.float32)
    ids, probs = Sampler(Sampling(temperature=0.05)).distribution(logits.astype(np.float64))
    assert np.all(np.isfinite(probs)) and probs[0] == pytest.approx(1.0) and probs[1] == pytest.approx(np.exp(-20))
    assert np.exp(log_softmax(np.array([1000.0, 999.0]))) == pytest.approx([1 / (1 + np.exp(-1)), 1 / (1 + np.e)])


def test_a_repeat_window_of_0_or_1_tokens_penalises_what_it_says():
    logits = np.array([2.0, 2.0, 2.0, 2.0], dtype=np.float32)
    assert primed(Sampling(repeat_penalty=2.0, repeat_last_n=0), [0, 1], [2]).adjusted(logits).tolist() == [2.0] * 4
    assert primed(Sampling(repeat_penalty=2.0, repeat_last_n=1), [0, 1], [2]).adjusted(logits).tolist() == \
        [2.0, 2.0, 1.0, 2.0]


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.5)])
def test_presence_or_frequency_penalty_alone_applies(presence, frequency):
    logits = np.zeros(4, dtype=np.float32)
    s = primed(Sampling(presence_penalty=presence, frequency_penalty=frequency, repeat_penalty=1.0), [0], [1, 1])
    assert s.adjusted(logits).tolist() == [0.0, -(presence + 2 * frequency), 0.0, 0.0]


def test_penalties_without_a_prompt_count_the_whole_answer():
    s = Sampler(Sampling(temperature=0.0, presence_penalty=2.0, repeat_penalty=1.0))   # begin() never called
    logits = np.array([1.0, 0.0], dtype=np.float32)
    assert [s(logits), s(logits)] == [0, 1]   # the first token's presence penalty (2) outweighs its lead (1)
    assert s.last_logprob is None   # no logprobs asked for


def test_top_k_takes_the_k_best_of_a_large_vocabulary_for_every_k():
    logits = random_logits(13, n=5000)
    for k in (2, 3, 17, 100, 999, 4999):
        ids, _ = Sampler(Sampling(top_k=k)).distribution(logits.astype(np.float64))
        assert list(ids) == sorted(np.argsort(-logits)[:k])


def test_top_p_1_keeps_even_the_least_likely_tokens():
    # their probabilities (e^-50, e^-100) vanish in a cumulative sum that reaches 1.0 at the first token
    ids, _ = Sampler(Sampling(top_p=1.0)).distribution(np.array([0.0, -50.0, -100.0]))
    assert list(ids) == [0, 1, 2]


def test_min_p_1_keeps_every_token_tied_with_the_best():
    ids, probs = Sampler(Sampling(min_p=1.0)).distribution(np.array([1.0, 3.0, 3.0, 2.0]))
    assert list(ids) == [1, 2] and list(probs) == [0.5, 0.5]


def tied_logits(n: int, top: int, middle: int) -> np.ndarray:
    """`top` tokens tied at the best logit, `middle` tied below them, the rest below those; ids shuffled."""
    levels = np.repeat([2.0, 1.0, 0.0], [top, middle, n - top - middle])
    return np.random.default_rng(n + top).permutation(levels)


@pytest.mark.parametrize("n, top, middle, nucleus", [
    (300, 100, 100, 150),    # the full sort
    (2000, 300, 212, 350),   # the best 512 alone: the shortcut's own sort
    (2000, 700, 200, 100),   # 700 tied at the top: which 512 of them is the full sort's business
    (2000, 300, 400, 350),   # the 512th best tied with tokens outside the best 512
])
def test_top_p_breaks_ties_in_id_order(n, top, middle, nucleus):
    logits = tied_logits(n, top, middle)
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")
    top_p = float(np.cumsum(p[order])[nucleus - 1])   # the nucleus: the first ones in (probability, id) order
    ids, _ = Sampler(Sampling(top_p=top_p - 1e-9)).distribution(logits)
    assert list(ids) == list(order[:nucleus])


def test_top_p_on_a_large_vocabulary_finds_the_true_best_tokens():
    rng = np.random.default_rng(14)
    for trial in range(20):
        logits = rng.standard_normal(3000) * 0.3    # flat: the nucleus needs hundreds of tokens
        p = softmax(logits)
        order = np.argsort(-p, kind="stable")
        n = int(rng.integers(300, 511))
        ids, _ = Sampler(Sampling(top_p=float(np.cumsum(p[order])[n - 1]) - 1e-12)).distribution(logits)
        assert list(ids) == list(order[:n])
    logits = np.zeros(3000)
    logits[2500] = 20.0   # one dominant token, not the lowest id among the best 512
    ids, _ = Sampler(Sampling(top_p=0.5)).distribution(logits)
    assert list(ids) == [2500]


@pytest.mark.parametrize("n", [sampler_module.TOP_P_PREFIX, sampler_module.TOP_P_PREFIX + 1])
def test_top_p_on_a_vocabulary_at_the_shortcuts_edge_is_the_full_sorts_nucleus(n):
    logits = np.random.default_rng(n).standard_normal(n) * 0.3   # flat: every token's mass is sizeable
    # the shortcut's prefix is then the whole vocabulary, or all of it but one token
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")
    mass = np.concatenate([[0.0], np.cumsum(p[order])])
    for nucleus in (1, 40, n - 1):
        top_p = float(mass[nucleus - 1] + mass[nucleus]) / 2   # between the mass of one token fewer and its own
        ids, _ = Sampler(Sampling(top_p=top_p)).distribution(logits)
        assert list(ids) == list(order[:nucleus])


def test_top_p_sorts_only_the_best_512_when_they_reach_the_mass(monkeypatch):
    sorted_sizes = []

    class CountingNumpy:   # numpy, counting the lengths argsort sorts
        def __getattr__(self, name):
            return getattr(np, name)

        def argsort(self, a, *args, **kwargs):
            sorted_sizes.append(np.size(a))
            return np.argsort(a, *args, **kwargs)

    logits = random_logits(4, n=50_000).astype(np.float64)
    p = np.sort(softmax(logits))[::-1]
    assert p[:512].sum() > 0.6
    monkeypatch.setattr(sampler_module, "np", CountingNumpy())
    Sampler(Sampling(top_p=0.6)).distribution(logits)
    assert sorted_sizes == [sampler_module.TOP_P_PREFIX]


def test_top_logprobs_give_exactly_the_n_best_in_order():
    logits = random_logits(15)
    lp = log_softmax(logits)
    for n in (0, 1, 2, 5, 20):
        top = sampler_module.token_logprob(logits, 0, n).top
        assert top == tuple((int(i), float(lp[i])) for i in np.argsort(-lp, kind="stable")[:n])
    three = np.array([0.5, 2.0, 1.0])   # as many as the vocabulary holds
    assert [t for t, _ in sampler_module.token_logprob(three, 0, 3).top] == [1, 2, 0]
