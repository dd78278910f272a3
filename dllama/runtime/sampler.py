"""Next-token choice from logits: the one owner of sampling's arithmetic (docs/API.md, "Sampling").

The order follows Hugging Face's generate(): logit_bias, then the penalties (repeat over the last
tokens of the context, presence/frequency over the answer so far), then greedy argmax at temperature
0, else temperature, top_k, top_p and min_p, and a draw. Everything is numpy over the whole vocabulary
or over the ids that matter (the penalised ones, the candidates); no Python loop per vocabulary entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from dllama.runtime.engine import EngineError

DEFAULT_REPEAT_PENALTY = 1.1   # when sampling (temperature > 0) and the caller did not choose one
DEFAULT_REPEAT_LAST_N = 64
BAN_BIAS = -100.0              # a logit_bias this low bans the token (OpenAI's "-100 should result in a ban")
MAX_TOP_LOGPROBS = 20
TOP_P_PREFIX = 512             # top_p first looks among this many best tokens, and sorts the vocabulary only if needed


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The defaults are OpenAI's (temperature 1, top_p 1, a random seed,
    no penalties), except repeat_penalty: None means DEFAULT_REPEAT_PENALTY over the last
    DEFAULT_REPEAT_LAST_N tokens when temperature > 0 (it keeps small models from looping) and off at
    temperature 0, so that greedy decoding stays exactly the model's argmax."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0                          # 0: off
    min_p: float = 0.0                      # 0: off
    repeat_penalty: float | None = None     # 1: off; None: see above
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None         # None: no logprobs; n: the chosen token's and the n most likely

    @property
    def effective_repeat_penalty(self) -> float:
        if self.repeat_penalty is not None:
            return self.repeat_penalty
        return DEFAULT_REPEAT_PENALTY if self.temperature > 0 else 1.0


GREEDY = Sampling(temperature=0.0)


@dataclass(frozen=True)
class TokenLogprob:
    """log_softmax of the engine's raw logits at one step: the chosen token's and the most likely ones."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class NaNLogits(EngineError):
    def __init__(self):
        super().__init__("the model computed NaN or infinite logits: its weights hold inf or NaN values (a corrupt "
                         ".m?); check it with dllama-validate and convert it again")


def _check(sampling: Sampling) -> None:
    # written as `not (x in range)` so that NaN fails too
    checks = [
        (sampling.temperature >= 0 and math.isfinite(sampling.temperature),
         f"temperature {sampling.temperature} must be a finite number >= 0 (0 is greedy)"),
        (0.0 < sampling.top_p <= 1.0, f"top_p {sampling.top_p} is outside (0, 1]"),
        (sampling.top_k >= 0, f"top_k {sampling.top_k} must be >= 0 (0 turns it off)"),
        (0.0 <= sampling.min_p <= 1.0, f"min_p {sampling.min_p} is outside [0, 1]"),
        (sampling.effective_repeat_penalty > 0 and math.isfinite(sampling.effective_repeat_penalty),
         f"repeat_penalty {sampling.repeat_penalty} must be a finite number > 0 (1 turns it off)"),
        (sampling.repeat_last_n >= 0, f"repeat_last_n {sampling.repeat_last_n} must be >= 0"),
        (-2.0 <= sampling.presence_penalty <= 2.0, f"presence_penalty {sampling.presence_penalty} is outside [-2, 2]"),
        (-2.0 <= sampling.frequency_penalty <= 2.0,
         f"frequency_penalty {sampling.frequency_penalty} is outside [-2, 2]"),
        (sampling.top_logprobs is None or 0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS,
         f"top_logprobs {sampling.top_logprobs} is outside [0, {MAX_TOP_LOGPROBS}]"),
        (sampling.seed is None or sampling.seed >= 0, f"seed {sampling.seed} must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise EngineError(message)


class Sampler:
    """Chooses tokens for one generation. begin(prompt_ids) gives it the context; each call
    sample(logits) chooses the next token and remembers it (the penalties look back at both).

    Sampler(Sampling(...)) follows the Sampling's defaults (a repeat penalty when sampling);
    Sampler(temperature=..., top_p=..., seed=...) is exactly those settings: greedy unless a
    temperature is given, and no penalty unless one is.
    """

    def __init__(self, sampling: Sampling | None = None, **fields):
        if sampling is None:
            sampling = Sampling(**{"temperature": 0.0, "repeat_penalty": 1.0, **fields})
        elif fields:
            raise TypeError("give a Sampling or its fields, not both")
        _check(sampling)
        self.sampling = sampling
        self.repeat_penalty = sampling.effective_repeat_penalty
        self.bias_ids = np.fromiter(sampling.logit_bias.keys(), dtype=np.int64, count=len(sampling.logit_bias))
        self.bias_values = np.fromiter(sampling.logit_bias.values(), dtype=np.float64, count=len(sampling.logit_bias))
        self.context: list[int] = []       # prompt and answer so far
        self.n_prompt = 0
        self.last_logprob: TokenLogprob | None = None
        self._rng: np.random.Generator | None = None  # greedy needs none (and numpy.random takes ~15 ms to import)

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self.context = [int(t) for t in prompt_ids]
        self.n_prompt = len(self.context)

    @property
    def adjusts_logits(self) -> bool:
        s = self.sampling
        return (self.bias_ids.size > 0 or (self.repeat_penalty != 1.0 and s.repeat_last_n > 0)
                or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0)

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """The next token; `allowed` (a boolean mask over the logits, from a grammar) removes the tokens
        it marks False before anything else, greedy included. Logprobs stay those of the raw logits."""
        token = self.choose(logits if allowed is None else np.where(allowed, logits, -np.inf))
        if self.sampling.top_logprobs is not None:
            self.last_logprob = token_logprob(logits, token, self.sampling.top_logprobs)
        self.context.append(token)
        return token

    def choose(self, logits: np.ndarray) -> int:
        """The next token for these logits, without remembering it."""
        if not self.adjusts_logits and self.sampling.temperature == 0:
            token = int(np.argmax(logits))      # the engine's own argmax, bit for bit
            if math.isnan(logits[token]) or logits[token] == np.inf:  # argmax stops at the first NaN
                raise NaNLogits()
            return token
        z = self.adjusted(logits)
        top = z.max()
        if math.isnan(top) or top == np.inf:
            raise NaNLogits()
        if not top > -np.inf:
            raise EngineError("logit_bias bans every token of the vocabulary: ban fewer")
        if self.sampling.temperature == 0:
            return int(np.argmax(z))
        ids, probs = self.distribution(z)
        return int(ids[self.rng.choice(len(ids), p=probs)])

    # -- the steps, each testable on its own

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """float64 logits after logit_bias and the penalties."""
        z = np.array(logits, dtype=np.float64)
        if self.bias_ids.size:
            z[self.bias_ids] += self.bias_values
            z[self.bias_ids[self.bias_values <= BAN_BIAS]] = -np.inf
        s = self.sampling
        if self.repeat_penalty != 1.0 and s.repeat_last_n > 0 and self.context:
            # CTRL's penalty, as llama.cpp and transformers apply it: positive logits shrink, negative grow
            seen = np.unique(np.asarray(self.context[-s.repeat_last_n:], dtype=np.int64))
            z[seen] = np.where(z[seen] > 0, z[seen] / self.repeat_penalty, z[seen] * self.repeat_penalty)
        if (s.presence_penalty or s.frequency_penalty) and len(self.context) > self.n_prompt:
            # OpenAI's formula over the answer so far: mu[j] - c[j] * frequency - (c[j] > 0) * presence
            ids, counts = np.unique(np.asarray(self.context[self.n_prompt:], dtype=np.int64), return_counts=True)
            z[ids] -= counts * s.frequency_penalty + s.presence_penalty
        return z

    def distribution(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities summing to 1) after temperature, top_k, top_p and min_p."""
        s = self.sampling
        z = z / s.temperature
        ids = np.arange(z.size)
        if 0 < s.top_k < z.size:
            ids = np.sort(np.argpartition(-z, s.top_k - 1)[:s.top_k])
        probs = np.exp(z[ids] - z[ids].max())
        probs /= probs.sum()
        if s.top_p < 1.0:
            ids, probs = _nucleus(ids, probs, s.top_p)
        if s.min_p > 0.0:
            keep = probs >= s.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
        return ids, probs / probs.sum()

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.sampling.seed)
        return self._rng


def _nucleus(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of the most likely candidates whose mass reaches top_p, most likely first
    (ties in id order, as a stable sort of the whole vocabulary would give)."""
    order = None
    if probs.size > TOP_P_PREFIX:
        best = np.sort(np.argpartition(-probs, TOP_P_PREFIX - 1)[:TOP_P_PREFIX])
        prefix = best[np.argsort(-probs[best], kind="stable")]
        # argpartition picks any of the tokens tied with the prefix's last one: the full sort then decides
        no_tie_outside = np.count_nonzero(probs >= probs[prefix[-1]]) == TOP_P_PREFIX
        if no_tie_outside and probs[prefix].sum() >= top_p:
            order = prefix
    if order is None:
        order = np.argsort(-probs, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    order = order[:cut]
    return ids[order], probs[order]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the engine's raw logits, and the `top` most likely."""
    lp = log_softmax(logits)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = np.argpartition(-lp, top - 1)[:top]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = tuple((int(i), float(lp[i])) for i in ids)
    return TokenLogprob(int(token), float(lp[token]), best)
