"""Token generation on an Engine: prefill the prompt in batches, then one token at a time."""
from __future__ import annotations

from typing import Callable, Generator, Iterable, Protocol, Sequence

import numpy as np

from dllama.runtime.conversation import (
    Conversation,
    Forwarding,
    StopReason,
    reusable_prefix,  # noqa: F401 (its callers import it from here)
)
from dllama.runtime.sampler import Sampler, Sampling


class _Model(Forwarding, Protocol):
    max_seq_len: int


class Constraint(Protocol):
    """Which tokens may come next (runtime/structured.py's GrammarConstraint)."""
    done: bool  # nothing but an end of sequence may follow

    def allowed(self, n_logits: int) -> np.ndarray: ...
    def advance(self, token: int) -> None: ...


def generate(engine: _Model, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_ids: Iterable[int] = (),
             cancel: Callable[[], bool] | None = None, start_pos: int = 0,
             conversation: Conversation | None = None,
             sampler: Sampler | None = None,
             constraint: Constraint | None = None) -> Generator[int, None, StopReason]:
    """Yield up to `max_tokens` generated ids; an eos id ends generation and is not yielded.

    Generation also stops when the cache is full or `cancel()` returns True (polled before every
    token); the reason is the generator's return value and `conversation.stop_reason`. With a
    `conversation`, the prompt's tokens its cache already holds are not evaluated again; without
    one, the caller vouches that the engine's cache holds prompt_ids[:start_pos]. A `sampler`
    (runtime/sampler.py: top_k, penalties, logprobs...) replaces temperature/top_p/seed. A
    `constraint` masks the logits before every token and ends generation (as an eos would) once
    it is done.
    """
    if conversation is None:
        conversation = Conversation(engine.max_seq_len, cached=list(prompt_ids[:start_pos]))
    pos = conversation.begin(prompt_ids)
    sample = sampler or Sampler(Sampling(temperature, top_p, seed))
    sample.begin(conversation.prompt_ids)
    eos = set(eos_ids)
    if cancel is not None and cancel():
        return conversation.stop(StopReason.CANCELLED)
    logits = conversation.forward(engine, conversation.prompt_ids[pos:], pos, last_only=True)[-1]
    pos = len(conversation.prompt_ids)
    for i in range(max_tokens):
        if cancel is not None and cancel():
            return conversation.stop(StopReason.CANCELLED)
        token = sample(logits, None if constraint is None else constraint.allowed(len(logits)))
        if token in eos:
            return conversation.stop(StopReason.EOS)
        yield token
        if constraint is not None:
            constraint.advance(token)
            if constraint.done:
                return conversation.stop(StopReason.EOS)
        if i + 1 == max_tokens:
            return conversation.stop(StopReason.MAX_TOKENS)
        if pos >= conversation.capacity:
            return conversation.stop(StopReason.CONTEXT)
        logits = conversation.forward(engine, [token], pos)[0]
        pos += 1
    return conversation.stop(StopReason.MAX_TOKENS)  # max_tokens 0
