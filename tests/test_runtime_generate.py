"""generate(): stopping (eos, max tokens, full cache, cancel), cache reuse; the sampler."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures

from dllama.runtime.conversation import Conversation, PromptTooLong, StopReason, answer_room
from dllama.runtime.engine import Engine, EngineError
from dllama.runtime.generate import generate, reusable_prefix
from dllama.runtime.sampler import Sampler, Sampling


@pytest.fixture
def case():
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    data = np.load(folder / "reference_logits.npz")
    return Engine.load(folder / "expected_f32.m"), data["ids1"].tolist(), data["greedy1"].tolist()


def test_eos_ends_generation_and_is_not_yielded(case):
    engine, ids, greedy = case
    stop = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i >= 2)
    got = list(generate(engine, ids, len(greedy), eos_ids=[greedy[stop]]))
    assert got == greedy[:stop]


def test_max_tokens_and_a_full_cache_both_end_generation(case):
    engine, ids, greedy = case
    assert list(generate(engine, ids, 5)) == greedy[:5]
    small = Engine.load(engine.model.path, max_seq_len=len(ids) + 3)
    assert list(generate(small, ids, 10)) == greedy[:4]  # the 4th token has no room left to be evaluated


def test_cancel_is_polled_before_every_token(case):
    engine, ids, greedy = case
    produced = []

    def cancel() -> bool:
        return len(produced) >= 3

    for token in generate(engine, ids, 10, cancel=cancel):
        produced.append(token)
    assert produced == greedy[:3]
    assert list(generate(engine, ids, 10, cancel=lambda: True)) == []


def test_start_pos_continues_a_cached_prefix(case):
    engine, ids, greedy = case
    engine.forward(ids[:6], 0)
    assert list(generate(engine, ids, 8, start_pos=6)) == greedy[:8]
    assert engine.pos == len(ids) + 7  # the 8th token is yielded but never evaluated


def test_prompt_longer_than_the_cache_is_refused(case):
    engine, ids, _ = case
    small = Engine.load(engine.model.path, max_seq_len=4)
    with pytest.raises(EngineError, match="raise --max-seq-len or shorten the prompt"):
        list(generate(small, ids, 4))


def test_sampler_greedy_seeded_and_nucleus():
    logits = np.array([0.0, 3.0, 1.0, 2.9], dtype=np.float32)
    assert Sampler(Sampling(temperature=0))(logits) == 1
    draws = [Sampler(Sampling(temperature=1.0, seed=s))(logits) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert [Sampler(Sampling(temperature=1.0, seed=5))(logits) for _ in range(3)] == [
        Sampler(Sampling(temperature=1.0, seed=5))(logits)] * 3
    # top_p 0.5: only the two best tokens (p ~ 0.48 and 0.43) can be drawn
    assert {Sampler(Sampling(temperature=1.0, top_p=0.5, seed=s))(logits) for s in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        Sampler(Sampling(top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        Sampler(Sampling(temperature=-1))


def test_reusable_prefix_keeps_the_last_prompt_token_to_evaluate():
    assert reusable_prefix([1, 2, 3, 9], [1, 2, 3, 4, 5]) == 3   # diverges at the fourth token
    assert reusable_prefix([1, 2, 3, 4, 5, 6], [1, 2, 3]) == 2   # whole prompt cached: its last token runs again
    assert reusable_prefix([], [7]) == 0


def test_generate_says_why_it_stopped(case):
    engine, ids, greedy = case
    stop = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i >= 2)
    runs = {
        StopReason.MAX_TOKENS: dict(max_tokens=3),
        StopReason.EOS: dict(max_tokens=len(greedy), eos_ids=[greedy[stop]]),
        StopReason.CANCELLED: dict(max_tokens=3, cancel=lambda: True),
    }
    for reason, kwargs in runs.items():
        conversation = Conversation(engine.max_seq_len)
        list(generate(engine, ids, conversation=conversation, **kwargs))
        assert conversation.stop_reason == reason
    small = Engine.load(engine.model.path, max_seq_len=len(ids) + 3)
    conversation = Conversation(small.max_seq_len)
    list(generate(small, ids, 10, conversation=conversation))
    assert conversation.stop_reason == StopReason.CONTEXT


def test_a_conversation_evaluates_only_what_its_cache_lacks(case):
    engine, ids, greedy = case
    conversation = Conversation(engine.max_seq_len)
    first = list(generate(engine, ids, 4, conversation=conversation))
    assert conversation.start_pos == 0 and conversation.cached == ids + first[:3]  # the 4th is never evaluated
    again = list(generate(engine, ids + first, 4, conversation=conversation))
    assert conversation.start_pos == len(ids) + 3
    assert again == greedy[4:8]


def test_a_prompt_that_fills_the_cache_is_refused_in_one_place():
    assert answer_room(7, 8) == 1
    with pytest.raises(PromptTooLong, match="--max-seq-len is 8"):
        answer_room(8, 8)
