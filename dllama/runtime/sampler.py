"""Next-token choice from logits: greedy at temperature 0, else temperature + top-p (nucleus)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dllama.runtime.engine import EngineError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the defaults are OpenAI's (temperature 1, top_p 1, a random seed)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise EngineError(f"temperature {temperature} is negative: use 0 for greedy or a positive value")
        if not 0.0 < top_p <= 1.0:
            raise EngineError(f"top_p {top_p} is outside (0, 1]")
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self._rng: np.random.Generator | None = None  # greedy needs none (and numpy.random takes ~15 ms to import)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        if self.top_p < 1.0:
            # the smallest prefix of the most likely tokens whose mass reaches top_p
            cut = int(np.searchsorted(np.cumsum(probs[order]), self.top_p)) + 1
            order = order[:cut]
        kept = probs[order]
        return int(order[self.rng.choice(len(order), p=kept / kept.sum())])

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng
