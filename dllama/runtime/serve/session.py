"""One generation at a time on an engine, reusing the KV cache across requests.

Runs synchronously in the server's single worker thread. The engine's KV cache holds the
tokens of the previous request (its prompt and what it generated); a new request whose tokens
start with the same ids only evaluates the rest (Engine.forward at pos = matched length).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from dllama.runtime.serve.protocol import Sampling


class EngineLike(Protocol):
    def forward(self, token_ids: Sequence[int], pos: int) -> np.ndarray: ...


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...
    def stream_decoder(self): ...
    def is_eos(self, token_id: int) -> bool: ...


class EngineFailure(RuntimeError):
    """The engine (or the cluster behind it) failed mid-request; the cache is no longer trusted."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = Sampling()


@dataclass
class Outcome:
    finish_reason: str          # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int          # prompt tokens served from the KV cache


class StopScanner:
    """Cuts the text at the first stop sequence, even when it spans several tokens.

    Text that could still be the start of a stop sequence is held back until the next piece
    decides it, so a stop sequence is never emitted in part.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Returns the text that is now safe to emit; sets .stopped when a stop sequence matched."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        keep = self._held_back_length()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back_length(self) -> int:
        # the longest suffix of pending that is a proper prefix of some stop sequence
        for n in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Temperature 0 is greedy; otherwise softmax(logits / T) cut to the top_p nucleus."""
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        nucleus = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=nucleus)])
    return int(rng.choice(len(probs), p=probs))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """The engine, the tokenizer, and which tokens the engine's KV cache currently holds."""

    def __init__(self, engine: EngineLike, tokenizer: TokenizerLike, context_length: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.cached: list[int] = []      # token ids at KV positions 0..len-1
        self.evaluated_tokens = 0        # tokens run through forward(), for tests and stats
        self._lock = threading.Lock()    # belt and braces: the scheduler already serialises jobs

    def prompt_ids(self, kind: str, messages: list[dict], prompt: str | list[int]) -> list[int]:
        if kind == "chat":
            # the chat template writes its own bos (as Hugging Face's apply_chat_template does)
            return self.tokenizer.encode(self.tokenizer.render_chat(messages, add_generation_prompt=True), add_bos=False)
        if isinstance(prompt, list):
            return list(prompt)
        return self.tokenizer.encode(prompt)

    def run(self, job: Job, cancelled: threading.Event, emit: Callable[[str], None]) -> Outcome:
        """Generates for one job, calling emit(text) for each piece of text that is final."""
        with self._lock:
            return self._run(job, cancelled, emit)

    def _run(self, job: Job, cancelled: threading.Event, emit: Callable[[str], None]) -> Outcome:
        prompt = job.prompt_ids
        if cancelled.is_set():  # the client left while it waited in the queue
            return Outcome("cancelled", len(prompt), 0, 0)
        reused = min(common_prefix_length(self.cached, prompt), len(prompt) - 1)
        budget = min(job.max_tokens, self.context_length - len(prompt))
        rng = np.random.default_rng(job.sampling.seed)
        decoder = self.tokenizer.stream_decoder()
        scanner = StopScanner(job.stop)
        logits = self._evaluate(prompt[reused:], reused)
        generated = 0
        finish = "length"
        while generated < budget:
            if cancelled.is_set():
                finish = "cancelled"
                break
            token = sample_token(logits, job.sampling, rng)
            generated += 1
            if self.tokenizer.is_eos(token):
                finish = "stop"
                break
            text = scanner.push(decoder.push(token))
            if text:
                emit(text)
            if scanner.stopped:
                finish = "stop"
                break
            if generated < budget:
                logits = self._evaluate([token], len(prompt) + generated - 1)
        if not scanner.stopped and finish != "cancelled":
            tail = scanner.push(decoder.flush())
            tail += "" if scanner.stopped else scanner.flush()
            if tail:
                emit(tail)
            if scanner.stopped:
                finish = "stop"
        return Outcome(finish, len(prompt), generated, reused)

    def _evaluate(self, token_ids: list[int], pos: int) -> np.ndarray:
        """Runs token_ids at positions pos.. and returns the logits of the last one."""
        del self.cached[pos:]
        try:
            logits = self.engine.forward(token_ids, pos)
        except Exception as e:
            self.cached = []
            raise EngineFailure(str(e) or type(e).__name__) from e
        self.cached.extend(token_ids)
        self.evaluated_tokens += len(token_ids)
        return np.asarray(logits)[-1]
