"""One KV cache's conversation: the tokens it holds, the prompt being answered, why the answer ended.

generate() keeps it; the chat command and the server keep one across turns and requests, so a
prompt that starts with what the cache already holds evaluates only the rest. It is also the one
place that decides whether a prompt leaves room for an answer.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from dllama.runtime.engine import EngineError


class StopReason(str, enum.Enum):
    EOS = "eos"               # the model ended its answer (the eos id is not yielded)
    MAX_TOKENS = "max_tokens"  # the caller's limit
    CONTEXT = "context"       # the KV cache is full
    CANCELLED = "cancelled"   # cancel() said so


class PromptTooLong(EngineError):
    """A prompt that leaves the KV cache no room for one generated token."""

    def __init__(self, n_tokens: int, capacity: int):
        super().__init__(f"the prompt has {n_tokens} tokens but --max-seq-len is {capacity}, which leaves no room for "
                         "an answer: raise --max-seq-len or shorten the prompt")
        self.n_tokens = n_tokens
        self.capacity = capacity


class Forwarding(Protocol):
    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray: ...


def reusable_prefix(cached: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """How many leading prompt tokens a KV cache holding `cached` already has.
    The last prompt token is always evaluated again, since its logits give the first new token."""
    n = 0
    for a, b in zip(cached, prompt_ids):
        if a != b:
            break
        n += 1
    return min(n, len(prompt_ids) - 1)


def answer_room(n_prompt: int, capacity: int) -> int:
    """KV positions left for the answer after a prompt of `n_prompt` tokens; raises PromptTooLong
    when there is not one."""
    if n_prompt >= capacity:
        raise PromptTooLong(n_prompt, capacity)
    return capacity - n_prompt


@dataclass
class Conversation:
    capacity: int                                         # KV cache positions
    cached: list[int] = field(default_factory=list)       # token ids at KV positions 0..len-1
    prompt_ids: list[int] = field(default_factory=list)   # the prompt being answered
    start_pos: int = 0                                    # its tokens the cache already held
    stop_reason: StopReason | None = None                 # why the last answer ended (None: running)

    def begin(self, prompt_ids: Sequence[int]) -> int:
        """A new prompt: checks it fits, returns the position to evaluate it from."""
        if not prompt_ids:
            raise EngineError("the prompt has no tokens")
        answer_room(len(prompt_ids), self.capacity)
        self.prompt_ids = list(prompt_ids)
        self.start_pos = reusable_prefix(self.cached, self.prompt_ids)
        self.stop_reason = None
        return self.start_pos

    def forward(self, engine: Forwarding, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray:
        """engine.forward, noted in `cached`; a failed forward leaves nothing trusted in the cache."""
        del self.cached[pos:]
        try:
            logits = engine.forward(token_ids, pos, last_only)
        except BaseException:
            self.cached.clear()
            raise
        self.cached.extend(int(t) for t in token_ids)
        return logits

    def reset(self) -> None:
        """Forget every cached token, so the next prompt is evaluated from position 0. The engine's KV rows
        need no clearing: attention reads a position only after the forward that writes it again."""
        self.cached.clear()
        self.prompt_ids = []
        self.start_pos = 0
        self.stop_reason = None

    def stop(self, reason: StopReason) -> StopReason:
        self.stop_reason = reason
        return reason
