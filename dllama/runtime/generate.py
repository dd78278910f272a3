"""Token generation on an Engine: prefill the prompt in batches, then one token at a time."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

from dllama.runtime.engine import Engine, EngineError
from dllama.runtime.sampler import Sampler


def reusable_prefix(cached: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """How many leading prompt tokens a KV cache holding `cached` already has: generate()'s start_pos.
    The last prompt token is always evaluated again, since its logits give the first new token."""
    n = 0
    for a, b in zip(cached, prompt_ids):
        if a != b:
            break
        n += 1
    return min(n, len(prompt_ids) - 1)


def generate(engine: Engine, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_ids: Iterable[int] = (),
             cancel: Callable[[], bool] | None = None, start_pos: int = 0) -> Iterator[int]:
    """Yield up to `max_tokens` generated ids; an eos id ends generation and is not yielded.

    The KV cache must already hold prompt_ids[:start_pos] (reuse across requests); generation also
    stops when the cache is full or `cancel()` returns True (polled before every token).
    """
    prompt_ids = list(prompt_ids)
    if not start_pos < len(prompt_ids):
        raise EngineError(f"start_pos {start_pos} leaves no prompt token to evaluate ({len(prompt_ids)} tokens)")
    if len(prompt_ids) > engine.max_seq_len:
        raise EngineError(f"the prompt has {len(prompt_ids)} tokens but the KV cache holds {engine.max_seq_len}: "
                          "raise --max-seq-len or shorten the prompt")
    sample = Sampler(temperature, top_p, seed)
    eos = set(eos_ids)
    pos = len(prompt_ids)
    if cancel is not None and cancel():
        return
    logits = engine.forward(prompt_ids[start_pos:], start_pos)[-1]
    for i in range(max_tokens):
        if cancel is not None and cancel():
            return
        token = sample(logits)
        if token in eos:
            return
        yield token
        if i + 1 == max_tokens or pos >= engine.max_seq_len:
            return
        logits = engine.forward([token], pos)[0]
        pos += 1
