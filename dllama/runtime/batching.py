"""Continuous batching: several sequences, each generating in its own thread, share the engine's steps.

    batcher = StepBatcher(Engine.load(path, slots=4))
    tokens = list(generate(batcher.slot(2), prompt_ids, 128))   # in any thread: slot 2's KV cache
    generate_many(engine, [ids_a, ids_b, ...], max_tokens=128)   # -> each prompt's generated ids

A thread's `forward` (generate() calls it for the prompt, then once per token) waits while the
batcher's thread runs the forwards of every sequence as one `Engine.step`: one pass over the weights
for all of them. A step starts once every active sequence has a forward waiting (or LINGER_S after
the first one came); a prompt goes in chunks, so that the others keep generating while it is read:
each step carries every waiting sequence's next token and at most PREFILL_BATCH tokens in all.
Each token's logits are the bits it would get alone (Engine.step), so what a sequence generates does
not depend on which others share its steps.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.runtime.engine import PREFILL_BATCH, Engine, EngineError, SlotRun
from dllama.runtime.generate import generate

LINGER_S = 0.05  # how long a step waits for an active sequence still choosing its next token


class StepCancelled(DllamaError, RuntimeError):
    """A sequence's forward was given up (its cancel() said so) before all its tokens were evaluated."""


@dataclass
class _Forward:
    slot: int
    ids: np.ndarray
    pos: int
    last_only: bool
    cancel: Callable[[], bool] | None
    done: int = 0                        # tokens evaluated so far
    parts: list[np.ndarray] = field(default_factory=list)  # their logits (all tokens', or the last's)
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def left(self) -> int:
        return len(self.ids) - self.done


class SlotEngine:
    """What generate() sees of one slot: forward(token_ids, pos, last_only) through the batcher."""

    def __init__(self, batcher: "StepBatcher", slot: int, cancel: Callable[[], bool] | None = None):
        self.batcher, self.slot, self.cancel = batcher, slot, cancel
        self.max_seq_len = batcher.engine.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.batcher.engine.vocab_size

    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray:
        return self.batcher.forward(self.slot, token_ids, pos, last_only, self.cancel)


class StepBatcher:
    """Owns the engine's steps: one thread runs them for the forwards that the sequences' threads wait on."""

    def __init__(self, engine: Engine, linger_s: float = LINGER_S):
        self.engine = engine
        self.linger_s = linger_s
        self._cond = threading.Condition()
        self._waiting: list[_Forward] = []  # in arrival order
        self._active: dict[int, int] = {}   # slot -> active holders (sequences generating there)
        self._closed = False
        self.steps = 0                      # engine steps run (the tests and benchmarks count them)
        self._thread = threading.Thread(target=self._loop, name="dllama-steps", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return self.engine.slots

    def slot(self, slot: int, cancel: Callable[[], bool] | None = None) -> SlotEngine:
        """An engine-like view of one slot (cancel() gives up a forward still waiting or in chunks)."""
        return SlotEngine(self, slot, cancel)

    @contextmanager
    def active(self, slot: int) -> Iterator[None]:
        """A sequence generates in `slot` meanwhile: steps wait (up to linger_s) for its next forward."""
        with self._cond:
            self._active[slot] = self._active.get(slot, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._active[slot] -= 1
                if not self._active[slot]:
                    del self._active[slot]
                self._cond.notify_all()

    def forward(self, slot: int, token_ids: Sequence[int], pos: int, last_only: bool = False,
                cancel: Callable[[], bool] | None = None) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        request = _Forward(slot, ids, pos, last_only, cancel)
        with self._cond:
            if self._closed:
                raise DllamaError("the batcher is closed")
            if any(w.slot == slot for w in self._waiting):
                raise DllamaError(f"slot {slot} already has a forward waiting: one sequence per slot")
            self._waiting.append(request)
            self._cond.notify_all()
        request.finished.wait()
        if request.error is not None:
            raise request.error
        return request.parts[0] if len(request.parts) == 1 else np.concatenate(request.parts)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # ---------------------------------------------------------------------------------------
    # the steps' thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    for w in self._waiting:
                        self._finish(w, DllamaError("the batcher is closed"))
                    return
            self._run(batch)

    def _next_batch(self) -> list[tuple[_Forward, int]] | None:
        """(forward, tokens it gets) for the next step, once it is due (under the lock); None: closed."""
        while True:
            self._cond.wait_for(lambda: self._closed or self._waiting)
            if self._closed:
                return None
            deadline = time.monotonic() + self.linger_s
            while not self._closed and not self._everyone_waits() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            # a prompt between its chunks (a decoded token's forward is one step: generate() polls cancel itself)
            for w in [w for w in self._waiting if w.cancel is not None and w.left > 1 and w.cancel()]:
                self._finish(w, StepCancelled(f"slot {w.slot}'s forward was cancelled"))
            if self._waiting:
                return self._share()

    def _everyone_waits(self) -> bool:
        waiting = {w.slot for w in self._waiting}
        return all(slot in waiting for slot in self._active)

    def _share(self) -> list[tuple[_Forward, int]]:
        """Every waiting sequence's next token first; the rest of PREFILL_BATCH to prompts in arrival order."""
        budget = PREFILL_BATCH - len(self._waiting)
        batch = []
        for w in self._waiting:
            extra = min(w.left - 1, max(budget, 0))
            budget -= extra
            batch.append((w, 1 + extra))
        return batch

    def _run(self, batch: list[tuple[_Forward, int]]) -> None:
        runs = [SlotRun(w.slot, w.ids[w.done:w.done + n], w.pos + w.done, w.last_only) for w, n in batch]
        try:
            logits = self.engine.step(runs)
            error = None
        except EngineError as e:  # a run the engine refuses (checked before anything runs): find whose it is
            if len(batch) > 1:
                for item in batch:
                    self._run([item])
                return
            logits, error = None, e
        except BaseException as e:  # every sequence in the step sees it; the batcher goes on
            logits, error = None, e
        with self._cond:
            self.steps += 1
            for i, (w, n) in enumerate(batch):
                if error is not None:
                    self._finish(w, error)
                    continue
                w.done += n
                if not w.last_only:
                    w.parts.append(logits[i])
                elif not w.left:
                    w.parts.append(logits[i])
                if not w.left:
                    self._finish(w)

    def _finish(self, w: _Forward, error: BaseException | None = None) -> None:
        w.error = error
        self._waiting.remove(w)
        w.finished.set()


def generate_many(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                  eos_ids: Sequence[int] = (), **options) -> list[list[int]]:
    """Generate for every prompt, engine.slots of them at a time (Engine.load(slots=N)), each in the next free
    slot; returns each prompt's generated ids (without the eos). `options` go to each generate() call
    (temperature, seed, sampler...); at temperature 0 each answer is the one generate() gives alone."""
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise DllamaError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
    results: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    free = list(range(engine.slots))
    turn = threading.Condition()
    batcher = StepBatcher(engine)

    def work(i: int, slot: int) -> None:
        try:
            with batcher.active(slot):
                results[i] = list(generate(batcher.slot(slot), prompts[i], limits[i], eos_ids=eos_ids, **options))
        except BaseException as e:
            errors.append(e)
        finally:
            with turn:
                free.append(slot)
                turn.notify_all()

    threads = []
    try:
        for i in range(len(prompts)):
            with turn:
                turn.wait_for(lambda: free)
                slot = free.pop(0)
            threads.append(threading.Thread(target=work, args=(i, slot), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    if errors:
        raise errors[0]
    return results
