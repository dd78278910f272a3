"""Several sequences in one pass over the weights (Engine.step, runtime/batching.py): a sequence's logits
and greedy tokens are the bits it gets alone, whoever shares its steps."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures

from dllama.runtime.batching import StepBatcher, StepCancelled, generate_many
from dllama.runtime.engine import Engine, EngineError, SlotRun
from dllama.runtime.generate import generate

RNG = np.random.default_rng(25)
# lengths that put a prompt in one chunk, across two (more than 64 tokens) and at a single token
PROMPTS = [list(map(int, RNG.integers(2, 49000, size=n))) for n in (9, 3, 70, 1, 130, 20, 5, 40, 11, 2, 17)]
LIMITS = [10, 17, 4, 12, 8, 20, 2, 15, 9, 11, 5]


@pytest.fixture(scope="module")
def smollm2_q40(smollm2_files):
    return smollm2_files["q40"]


@pytest.fixture(scope="module")
def answers_alone(smollm2_q40):
    return alone(smollm2_q40, PROMPTS, LIMITS)


def alone(path, prompts, limits) -> list[list[int]]:
    engine = Engine.load(path, max_seq_len=256, nthreads=2)
    out = []
    for prompt, limit in zip(prompts, limits):
        engine.reset()
        out.append(list(generate(engine, prompt, limit)))
    return out


class CountingEngine(Engine):
    """Notes how many sequences each step carried."""
    sizes: list[int]

    def step(self, runs):
        self.sizes.append(len(runs))
        return super().step(runs)


@pytest.mark.parametrize("slots", [2, 4, 8])
def test_greedy_tokens_are_the_same_beside_1_3_or_7_others(smollm2_q40, answers_alone, slots):
    """11 prompts of 1 to 130 tokens, answers of 3 to 40: they start and stop at other times, prompts are
    read in chunks beside others' decoding, and each answer is the one it gets alone."""
    expected = answers_alone
    engine = CountingEngine.load(smollm2_q40, max_seq_len=256, nthreads=2, slots=slots)
    engine.sizes = []
    assert generate_many(engine, PROMPTS, LIMITS) == expected
    assert max(engine.sizes) == slots  # the slots really shared steps
    assert len(engine.sizes) < sum(LIMITS)  # fewer steps than tokens


def test_logits_are_bit_identical_in_any_batch(smollm2_q40):
    """Decoding tokens beside 0..7 others (passes of 1 to 4 tokens over each group of rows, 5 and 6 tokens
    split 4 + 1 and 4 + 2) and beside a prompt's chunk: every row's logits equal the token's alone, bit for
    bit."""
    single = Engine.load(smollm2_q40, max_seq_len=128, nthreads=2)
    engine = Engine.load(smollm2_q40, max_seq_len=128, nthreads=2, slots=9)
    prompts = [PROMPTS[i][:8] + [i + 2] for i in range(9)]
    expected = []
    for prompt in prompts:
        single.reset()
        single.forward(prompt[:-1], 0)
        expected.append(single.forward(prompt[-1:], len(prompt) - 1)[0])
    engine.step([SlotRun(s, p[:-1], 0, last_only=True) for s, p in enumerate(prompts)])
    for n in (1, 2, 4, 7, 8):
        got = engine.step([SlotRun(s, prompts[s][-1:], len(prompts[s]) - 1) for s in range(n)])
        for s in range(n):
            np.testing.assert_array_equal(got[s][0], expected[s], err_msg=f"slot {s} beside {n - 1} others")
    # beside a prompt (whose logits are not wanted but the last one's) in the same pass
    got = engine.step([SlotRun(8, prompts[8][-1:], len(prompts[8]) - 1), SlotRun(0, PROMPTS[4][:50], 0, True)])
    np.testing.assert_array_equal(got[0][0], expected[8])
    single.reset()
    np.testing.assert_array_equal(got[1][0], single.forward(PROMPTS[4][:50], 0, last_only=True)[0])


@pytest.mark.parametrize("float_type", ["f32", "q80"])
def test_step_keeps_every_tokens_logits_and_each_slots_cache(float_type):
    """Full logits of several tokens per run (not last_only), in slots that hold other lengths: f32 and q80
    weights (their own matmul kernels) on the conformance tiny-llama."""
    path = require_fixtures(CONFORMANCE / "tiny-llama") / f"expected_{float_type}.m"
    single = Engine.load(path, max_seq_len=64, nthreads=2)
    engine = Engine.load(path, max_seq_len=64, nthreads=2, slots=3)
    a, b, c = [5, 9, 31, 2, 7], [11, 3], [8, 8, 8, 1, 4, 6, 2, 9, 10]
    engine.step([SlotRun(0, a[:2], 0), SlotRun(2, c[:6], 0, last_only=True)])
    got = engine.step([SlotRun(2, c[6:], 6), SlotRun(1, b, 0), SlotRun(0, a[2:], 2)])
    for tokens, start, logits in ((c, 6, got[0]), (b, 0, got[1]), (a, 2, got[2])):
        single.reset()
        np.testing.assert_array_equal(logits, single.forward(tokens, 0)[start:])
    assert engine.slot_pos == [5, 2, 9]


def test_per_call_layers_take_places_too():
    """qwen3's q/k norms run the per-call blocks, not the compiled pass: the same answers beside others."""
    path = require_fixtures(CONFORMANCE / "tiny-qwen3") / "expected_f32.m"
    prompts, limits = [PROMPTS[i][:12] for i in range(4)], [6, 9, 4, 7]
    vocab = Engine.load(path, max_seq_len=64).vocab_size
    prompts = [[t % vocab for t in p] for p in prompts]
    expected = []
    single = Engine.load(path, max_seq_len=64, nthreads=2)
    for prompt, limit in zip(prompts, limits):
        single.reset()
        expected.append(list(generate(single, prompt, limit)))
    assert generate_many(Engine.load(path, max_seq_len=64, nthreads=2, slots=3), prompts, limits) == expected


def test_refused_runs(smollm2_q40):
    engine = Engine.load(smollm2_q40, max_seq_len=16, nthreads=2, slots=2)
    with pytest.raises(EngineError, match="one run per slot"):
        engine.step([SlotRun(1, [1], 0), SlotRun(1, [2], 1)])
    with pytest.raises(EngineError, match="slot 2 is not one of this engine's 2"):
        engine.step([SlotRun(2, [1], 0)])
    with pytest.raises(EngineError, match="past the 0 tokens in slot 1's KV cache"):
        engine.step([SlotRun(0, [1, 2], 0), SlotRun(1, [3], 4)])
    assert engine.slot_pos == [0, 0]  # nothing ran
    with pytest.raises(EngineError, match="do not fit the KV cache of 16"):
        engine.step([SlotRun(1, list(range(17)), 0)])


def test_a_cancelled_prompt_leaves_its_slot_at_once(smollm2_q40):
    """A prompt read in chunks stops at the next step once its cancel() says so; the other slot goes on."""
    engine = Engine.load(smollm2_q40, max_seq_len=256, nthreads=2, slots=2)
    batcher = StepBatcher(engine)
    cancelled = threading.Event()
    try:
        long_prompt = PROMPTS[4] + PROMPTS[2]  # 200 tokens: four chunks
        chunks_seen = []
        original = engine.step

        def step(runs):
            chunks_seen.append(len(runs))
            cancelled.set()  # after the first chunk
            return original(runs)

        engine.step = step
        with pytest.raises(StepCancelled):
            batcher.slot(1, cancelled.is_set).forward(long_prompt, 0, last_only=True)
        assert len(chunks_seen) == 1
        engine.step = original
        expected = alone(engine.model.path, [PROMPTS[0]], [5])[0]
        with batcher.active(0):
            assert list(generate(batcher.slot(0), PROMPTS[0], 5)) == expected
    finally:
        batcher.close()
