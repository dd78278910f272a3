"""Generations on an engine, reusing the KV cache across requests: one at a time, or one per KV cache slot.

A job runs synchronously in one of the server's worker threads. With one slot the engine's KV cache
holds the tokens of the previous request (its prompt and what it generated); a new request whose
tokens start with the same ids only evaluates the rest (runtime/conversation.py). With N slots
(serve --parallel N) each slot keeps its own conversation, a job takes the free slot whose cache
shares the most of its prompt, and the jobs' forwards meet in one engine step (runtime/batching.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.runtime.batching import StepBatcher, StepCancelled
from dllama.runtime.conversation import Conversation, PromptTooLong, StopReason, reusable_prefix
from dllama.runtime.engine import EngineError
from dllama.runtime.generate import generate
from dllama.runtime.sampler import Sampler, Sampling, TokenLogprob
from dllama.runtime.structured import GrammarConstraint, GrammarVocabulary


class EngineLike(Protocol):
    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray: ...


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str: ...
    def stream_decoder(self): ...
    eos_ids: list[int]


class EngineFailure(DllamaError, RuntimeError):
    """The engine (or the cluster behind it) failed mid-request; the cache is no longer trusted."""


class PromptTooManyCharacters(PromptTooLong):
    """A prompt text longer than any prompt that fits the context, found before tokenizing it."""

    def __init__(self, n_chars: int, limit: int, capacity: int):
        EngineError.__init__(self, f"the prompt has {n_chars} characters, more than a context of {capacity} tokens "
                             f"can hold (at most {limit}): shorten it or raise --max-seq-len")
        self.n_tokens = None
        self.capacity = capacity


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = Sampling()
    grammar: str | None = None     # the answer follows it (runtime/structured.py)


@dataclass(frozen=True)
class Piece:
    """Text that is final, and the logprobs of the tokens it came from (when the job asked for them)."""
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Outcome:
    finish_reason: str          # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int          # prompt tokens served from the KV cache
    first_token_s: float = 0.0  # from the start of the job to the first generated token (the prefill)
    decode_s: float = 0.0       # from the first generated token to the last


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


SLOT_SIMILARITY = 0.5  # share of a prompt a slot's cache must hold for the prompt to go there rather than the LRU


class JobRunner:
    """The engine, the tokenizer, and the conversation each KV cache slot holds: a job per slot at a time
    (slots > 1: an engine with Engine.load(slots=N), its steps shared through a StepBatcher)."""

    def __init__(self, engine: EngineLike, tokenizer: TokenizerLike, context_length: int, slots: int = 1):
        self.engine = engine
        self.tokenizer = tokenizer
        self.conversations = [Conversation(context_length) for _ in range(slots)]
        self.max_prompt_chars = prompt_char_limit(tokenizer, context_length)
        self.batcher = StepBatcher(engine) if slots > 1 else None
        self._free = list(range(slots))  # least recently used first
        self._lock = threading.Lock()

    @property
    def conversation(self) -> Conversation:
        """Slot 0's (the only one without --parallel)."""
        return self.conversations[0]

    @property
    def slots(self) -> int:
        return len(self.conversations)

    @property
    def active(self) -> int:
        """Slots generating now."""
        return self.slots - len(self._free)

    @property
    def context_length(self) -> int:
        return self.conversation.capacity

    def forget_caches(self) -> None:
        """Every slot's KV cache is empty (a rebuilt cluster)."""
        for conversation in self.conversations:
            conversation.cached = []

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def prompt_ids(self, kind: str, messages: list[dict], prompt: str | list[int],
                   template_vars: dict | None = None) -> list[int]:
        """The prompt's token ids (template_vars: more chat template variables, e.g. tools); a text too long
        to fit the context is refused before it is tokenized (PromptTooLong), since tokenizing megabytes
        costs seconds and hundreds of MB."""
        if kind != "chat" and isinstance(prompt, list):
            return list(prompt)
        if kind == "chat":   # the messages alone, before the template copies them
            self._check_length(sum(len(m.get("content") or "") for m in messages))
        # the chat template writes its own bos (as Hugging Face's apply_chat_template does)
        text = self.tokenizer.render_chat(messages, **(template_vars or {})) if kind == "chat" else prompt
        self._check_length(len(text))
        return self.tokenizer.encode(text, add_bos=False) if kind == "chat" else self.tokenizer.encode(text)

    def _check_length(self, n_chars: int) -> None:
        if self.max_prompt_chars is not None and n_chars > self.max_prompt_chars:
            raise PromptTooManyCharacters(n_chars, self.max_prompt_chars, self.context_length)

    def run(self, job: Job, cancelled: threading.Event, emit: Callable[[Piece], None]) -> Outcome:
        """Generates for one job, calling emit(Piece) for each piece of text that is final. The caller (the
        scheduler) runs at most `slots` jobs at once."""
        slot = self._take_slot(job.prompt_ids)
        try:
            if self.batcher is None:
                return self._run(job, cancelled, emit, self.engine, self.conversations[slot])
            with self.batcher.active(slot):
                return self._run(job, cancelled, emit, self.batcher.slot(slot, cancelled.is_set),
                                 self.conversations[slot])
        finally:
            with self._lock:
                self._free.append(slot)

    def _take_slot(self, prompt_ids: Sequence[int]) -> int:
        """The free slot whose cache holds the longest start of the prompt, when that is at least
        SLOT_SIMILARITY of it (the same conversation, as llama.cpp's server decides); else the least recently
        used, so that a new conversation does not take the cache of one that may come back."""
        with self._lock:
            if not self._free:
                raise EngineFailure(f"all {self.slots} slots are busy: the scheduler admitted one job too many")
            best = max(self._free, key=lambda s: reusable_prefix(self.conversations[s].cached, prompt_ids))
            if reusable_prefix(self.conversations[best].cached, prompt_ids) < SLOT_SIMILARITY * len(prompt_ids):
                best = self._free[0]
            self._free.remove(best)
            return best

    def _run(self, job: Job, cancelled: threading.Event, emit: Callable[[Piece], None], engine: EngineLike,
             conversation: Conversation) -> Outcome:
        sampler = Sampler(job.sampling)
        clock = _Clock()
        tokens = generate(_FailuresReported(engine), job.prompt_ids, job.max_tokens,
                          eos_ids=self.tokenizer.eos_ids, cancel=cancelled.is_set, conversation=conversation,
                          sampler=sampler, constraint=self.constraint(job.grammar))
        scanner = StopScanner(job.stop)
        try:
            generated = self._relay_text(clock.timed(tokens), scanner, sampler, emit)
        except EngineFailure as e:
            if not isinstance(e.__cause__, StepCancelled):
                raise
            generated = 0  # a prompt given up between two of its chunks: nothing was generated
        if scanner.stopped:
            finish = "stop"
        elif cancelled.is_set():
            finish = "cancelled"
        else:
            finish = FINISH_REASONS[conversation.stop_reason]
        return Outcome(finish, len(job.prompt_ids), generated, conversation.start_pos, clock.first_token_s,
                       clock.decode_s)

    def constraint(self, grammar: str | None) -> GrammarConstraint | None:
        return None if grammar is None else GrammarVocabulary.of(self.tokenizer).constraint(grammar)

    def _relay_text(self, tokens, scanner: StopScanner, sampler: Sampler, emit: Callable[[Piece], None]) -> int:
        """Decodes the tokens through the stop scanner into emit(); returns how many were generated."""
        decoder = self.tokenizer.stream_decoder()
        generated = 0
        logprobs: list[TokenLogprob] = []   # of the tokens whose text is not emitted yet
        try:
            for token in tokens:
                generated += 1
                if sampler.last_logprob is not None:
                    logprobs.append(sampler.last_logprob)
                text = scanner.push(decoder.push(token))
                if text:
                    emit(Piece(text, tuple(logprobs)))
                    logprobs.clear()
                if scanner.stopped:
                    return generated
        finally:
            tokens.close()
        tail = scanner.push(decoder.flush())
        tail += "" if scanner.stopped else scanner.flush()
        if tail:
            emit(Piece(tail, tuple(logprobs)))
        return generated


def prompt_char_limit(tokenizer, context_length: int) -> int | None:
    """The most characters a prompt that fits the context can have: no token covers more characters
    than its vocabulary entry has bytes; twice that leaves room for normalizers that merge characters."""
    tokens = getattr(getattr(tokenizer, "tf", None), "tokens", None)
    if not tokens:
        return None
    return 2 * context_length * max(max(map(len, tokens)), 1)


class _Clock:
    """Times a token stream: the wait for the first token (prefill) and the rest (decode)."""

    def __init__(self):
        self.first_token_s = 0.0
        self.decode_s = 0.0

    def timed(self, tokens):
        start = time.perf_counter()
        first = None
        try:
            for token in tokens:
                now = time.perf_counter()
                if first is None:
                    first = now
                    self.first_token_s = now - start
                self.decode_s = now - first
                yield token
        finally:
            tokens.close()


# why generate() stopped -> the API's finish_reason (a stop sequence is "stop" too)
FINISH_REASONS = {StopReason.EOS: "stop", StopReason.MAX_TOKENS: "length", StopReason.CONTEXT: "length",
                  StopReason.CANCELLED: "cancelled"}


class _FailuresReported:
    """The engine as generate() sees it in the server: any failure of a forward is an EngineFailure."""

    def __init__(self, engine: EngineLike):
        self._engine = engine

    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray:
        try:
            return self._engine.forward(token_ids, pos, last_only)
        except Exception as e:
            raise EngineFailure(str(e) or type(e).__name__) from e
