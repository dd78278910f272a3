"""The inference engine: embedding, layers, logits, with explicit exchange seams (FORMAT.md §2, §3).

    eng = Engine.load("model.m", max_seq_len=2048, nthreads=2)
    logits = eng.forward([1, 15043, 3186], pos=0)    # (3, vocab) float32, fills the KV cache
    eng.reset()

Per layer the node computes its partial `dim` vector after wo and after w2 (model.NodeLayers);
`Exchange.reduce_into` adds every node's partial into x in node order and
`Exchange.gather_logits` assembles the vocabulary slices. `LocalExchange` is the one-node case;
the distributed runtime supplies its own Exchanges over the network: the root's and each
worker's run this same layer loop (`Engine.run_layers`), the worker starting from the x the root
sent it.
"""
from __future__ import annotations

import ctypes
import gc
import mmap
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import FileRows, FloatType, ModelFile, ModelHeader
from dllama.runtime import dispatch
from dllama.runtime.model import CompiledPass, NodeLayers, Places, load_node_weights, logit_rows, whole_model_share

DEFAULT_MAX_SEQ_LEN = 2048  # models declare up to 131072 positions; the KV cache must fit a small board
PREFILL_BATCH = 64          # prompt tokens per pass over the weights


class EngineError(DllamaError, ValueError):
    """The engine cannot run this request (too long for the KV cache, bad token id, ...)."""


@dataclass(frozen=True)
class SlotRun:
    """One sequence's tokens in a step: token_ids at positions pos.. of KV cache slot `slot`; with last_only
    (a prompt) only the last token's logits are computed."""
    slot: int
    token_ids: Sequence[int]
    pos: int
    last_only: bool = False


class Exchange(Protocol):
    """Where nodes meet (FORMAT.md §3). Stages are "attention" (after wo) and "ffn" (after w2)."""

    def begin(self, x: np.ndarray, pos: int | Places, logits: str | int = "all") -> None:
        """A batch starts: x (T, dim) are the embedding rows of tokens at positions pos.. (or at their
        Places: a step's sequences, each in its KV cache slot; the root sends them to the workers);
        `logits`: whose logits the batch wants (a model.LOGITS_ROWS name, or a count of last rows)."""

    def reduce_into(self, x: np.ndarray, partial: np.ndarray | None, layer: int, stage: str) -> None:
        """x += every node's partial (T, dim), in node order; this node's is `partial` (None: it has none)."""

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        """This node's (T, its vocabulary rows) slice -> the full (T, vocab) logits (on the root)."""


class LocalExchange:
    """One node: the partial is its own sum and crosses no network, so it is added as computed.
    The reference rounds it through q80 even here (FORMAT.md §2), which costs accuracy for
    nothing; `quantize_partials` (--buffer-float-type q80) does the same, to compare with it."""

    def __init__(self, quantize_partials: bool = False):
        self.quantize_partials = quantize_partials

    @property
    def adds_partials_as_computed(self) -> bool:
        """x += partial (rounded through q80 first when quantize_partials) and nothing else: the node may run
        its whole pass in one call (NodeLayers.whole_pass, which rounds the same way)."""
        return True

    def begin(self, x: np.ndarray, pos: int | Places, logits: str | int = "all") -> None:
        pass

    def reduce_into(self, x: np.ndarray, partial: np.ndarray, layer: int, stage: str) -> None:
        if self.quantize_partials:
            dispatch.q80_roundtrip(partial)
        x += partial

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        return logits_slice


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc malloc.h)
# Blocks from 1 MiB up are mapped and unmapped; the heap keeps at most 1 MiB free at its top. At
# glibc's own 128 KiB each step's logits and sampler temporaries were mapped anew: +7% CPU per token
# (median of 6 paired rounds), against +4% at 1 MiB, inside the 0.92-1.05 of identical servers paired.
LARGE_ALLOCATION = 1 << 20


def keep_large_allocations_off_the_heap() -> None:
    """Fix glibc's mmap and trim thresholds (LARGE_ALLOCATION), for the rest of the process.

    glibc raises both to the size of each large block freed (up to 32 MiB and twice that), so the
    tokenizer's parse and every step's temporaries (a vocabulary of floats per sequence) are served
    from a heap that it then no longer trims: serve --parallel 4 on SmolLM2 held 82 MiB of heap
    after 4 x 128 tokens, 71 MiB with fixed thresholds (peak RSS 205.6 -> 194.8 MiB). No-op
    elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)
        libc.mallopt(M_TRIM_THRESHOLD, LARGE_ALLOCATION)
    except (OSError, AttributeError):  # not glibc
        pass


def release_freed_heap() -> None:
    """Give the C heap that loading freed (parsing the tokenizer's JSON: ~9 MiB) back to the system.

    glibc keeps freed heap pages for later mallocs, but the weights are memory-mapped, not
    malloc'ed, so on a small board those pages would sit unused beside them. No-op elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python < 3.13 lacks the name


def read_ahead_weights(model: ModelFile) -> None:
    """Read every tensor but the embedding into the page cache and map it before the first forward, as the
    reference loads its weights: MADV_WILLNEED starts the reads in large requests, then MADV_POPULATE_READ
    waits for them and maps the pages. A first prompt then does not wait on the disk page by page for
    weights the machine paged out since the last run (up to 2x its time on a small model); one node maps
    all of them in its first forward anyway, so peak RSS does not change. The embedding is read a row
    per token, by pread (ModelFile.rows), not through the map. Older kernels without POPULATE_READ keep the
    asynchronous read-ahead."""
    mapped = getattr(model.data, "_mmap", None)
    if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
        return
    embedding = model.layout["embedding"]
    ranges = [(start - start % mmap.PAGESIZE, stop) for start, stop in
              ((0, embedding.offset), (embedding.offset + embedding.spec.nbytes, len(model.data)))]
    for advice in (mmap.MADV_WILLNEED, MADV_POPULATE_READ):
        for start, stop in ranges:
            if stop > start:
                try:
                    mapped.madvise(advice, start, stop - start)
                except OSError:  # advice only (EINVAL: a kernel without POPULATE_READ)
                    break


def uses_q80_buffers(h: ModelHeader) -> bool:
    """The reference's default sync buffers for a cluster: q80 for q40/q80 weights (FORMAT.md §2)."""
    return h.weights_float_type in (FloatType.Q40, FloatType.Q80)


BUFFER_FLOAT_TYPES = ("f32", "q80")


def rounds_partials_on_one_node(buffer_float_type: str | None) -> bool:
    """One node exchanges nothing: partials stay float32 unless q80 buffers are asked for."""
    if buffer_float_type is not None and buffer_float_type.lower() not in BUFFER_FLOAT_TYPES:
        raise EngineError(f"unknown buffer float type {buffer_float_type!r}: use q80 or f32")
    return buffer_float_type is not None and buffer_float_type.lower() == "q80"


class Engine:
    def __init__(self, header: ModelHeader, layers: NodeLayers, exchange: Exchange, max_seq_len: int,
                 nthreads: int | None = None, embedding: np.ndarray | FileRows | None = None,
                 model: ModelFile | None = None):
        """`embedding` (vocab, dim): on the node that looks up tokens (an array or the file's rows,
        ModelFile.rows); a worker runs `run_layers` only.
        `model`: the file it was loaded from, if any."""
        dispatch.implementation()  # choose (on a first run, build) the kernels now, not inside the first forward
        self.header = header
        # not np.memmap's slower lookups
        self.embedding = embedding.view(np.ndarray) if isinstance(embedding, np.memmap) else embedding
        self.model = model
        self.layers = layers
        self.exchange = exchange
        self.max_seq_len = max_seq_len
        self.nthreads = nthreads or dispatch.max_threads()
        self.slot_pos = [0] * getattr(layers, "slots", 1)  # tokens currently in each slot's KV cache

    @property
    def pos(self) -> int:
        """Tokens currently in the KV cache (slot 0's: the one forward() uses)."""
        return self.slot_pos[0]

    @pos.setter
    def pos(self, value: int) -> None:
        self.slot_pos[0] = value

    @property
    def slots(self) -> int:
        """Sequences this engine keeps a KV cache for (Engine.load(slots=N)); step() runs them together."""
        return len(self.slot_pos)

    @classmethod
    def load(cls, model_path: str | os.PathLike, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
             nthreads: int | None = None, buffer_float_type: str | None = None, slots: int = 1) -> "Engine":
        """Memory-map the model (weights stay packed) and allocate a KV cache of `max_seq_len` positions for
        each of `slots` sequences (step() runs them together; memory becomes resident as positions are used).
        buffer_float_type "q80" rounds each partial through q80 as the reference does (default: not)."""
        model = ModelFile(model_path)
        read_ahead_weights(model)
        h = model.header
        max_seq_len = min(max_seq_len, h.max_seq_len) if h.max_seq_len > 0 else max_seq_len
        if max_seq_len < 1:
            raise EngineError(f"max_seq_len {max_seq_len} must be at least 1")
        if slots < 1:
            raise EngineError(f"slots {slots} must be at least 1")
        if problem := dispatch.threads_problem(nthreads):
            raise EngineError(problem)
        quantize_partials = rounds_partials_on_one_node(buffer_float_type)
        share = whole_model_share(h)
        layers = NodeLayers(h, load_node_weights(model, share), share, max_seq_len, slots)
        engine = cls(h, layers, LocalExchange(quantize_partials), max_seq_len, nthreads,
                     embedding=model.rows("embedding"), model=model)
        layers.prepare_whole_pass(PREFILL_BATCH, quantize_partials)
        return engine

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def reset(self, slot: int | None = None) -> None:
        """Forget the cached tokens (of every slot, or of `slot`); the next forward starts at position 0."""
        for s in range(self.slots) if slot is None else (slot,):
            self.slot_pos[s] = 0

    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray:
        """Evaluate tokens at positions pos.. (the cache must hold positions < pos); (T, vocab) float32, or
        with last_only (a prompt) the last token's (1, vocab): on one node the others' are not computed."""
        if len(token_ids) == 1 and (token_pass := self._token_pass()) is not None:
            return self._forward_token(token_pass, int(token_ids[0]), pos)
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise EngineError("forward needs at least one token")
        self._check(len(ids), int(ids.min()), int(ids.max()), pos)
        dispatch.set_threads(self.nthreads)  # per calling thread, like numba's
        out = np.empty((1 if last_only else len(ids), self.vocab_size), dtype=np.float32)
        for start in range(0, len(ids), PREFILL_BATCH):
            batch = ids[start:start + PREFILL_BATCH]
            final = start + len(batch) == len(ids)
            if last_only:
                rows, wanted = (out, "last") if final else (None, "none")
            else:
                rows, wanted = out[start:start + len(batch)], "all"
            logits = self._forward_batch(batch, pos + start, rows, wanted)
            if rows is not None and logits is not rows:
                rows[:] = logits[-len(rows):]
        self.pos = pos + len(ids)
        return out

    def _token_pass(self) -> CompiledPass | None:
        """The compiled pass that evaluates one token in one call, where this engine has one (a node whose
        partials are added as computed, with the embedding); else None."""
        if self.embedding is None or not getattr(self.exchange, "adds_partials_as_computed", False):
            return None
        return self.layers.compiled()

    def _forward_token(self, token_pass: CompiledPass, token: int, pos: int) -> np.ndarray:
        """forward([token], pos) with the fewest steps in Python: a generated token's path, where every
        numpy call after the weights have streamed through the caches costs tens of microseconds."""
        self._check(1, token, token, pos)
        dispatch.set_threads(self.nthreads)
        out = token_pass.one_token(self.embedding[token], pos, self._q80_partials())
        self.pos = pos + 1
        return out

    def _q80_partials(self) -> bool:
        """Whether the exchange rounds each partial through q80 before adding it (LocalExchange's option)."""
        return getattr(self.exchange, "quantize_partials", False)

    def _check(self, n_tokens: int, lowest: int, highest: int, pos: int, slot: int = 0) -> None:
        """n_tokens with ids lowest..highest can go at positions pos.. of `slot`."""
        if not 0 <= slot < self.slots:
            raise EngineError(f"slot {slot} is not one of this engine's {self.slots} (Engine.load(slots=N))")
        held = self.slot_pos[slot]
        if not 0 <= pos <= held:
            where = "the KV cache" if self.slots == 1 else f"slot {slot}'s KV cache"
            raise EngineError(f"position {pos} is past the {held} tokens in {where}; call reset() or continue "
                              f"at {held}")
        if pos + n_tokens > self.max_seq_len:
            raise EngineError(f"{pos + n_tokens} tokens do not fit the KV cache of {self.max_seq_len} positions: "
                              "raise --max-seq-len or shorten the prompt")
        if lowest < 0 or highest >= self.vocab_size:
            bad = highest if highest >= self.vocab_size else lowest
            raise EngineError(f"token id {bad} is outside the model's vocabulary of {self.vocab_size}")

    def step(self, runs: Sequence[SlotRun]) -> list[np.ndarray]:
        """Several sequences in one pass over the weights: each run's logits, (len(token_ids), vocab) or with
        last_only (1, vocab), in the order of `runs` (at most one run per slot). Each token attends to its own
        slot's cache only, and its logits are the bits forward() would give it alone. More than PREFILL_BATCH
        tokens in all go in several passes, every run's first tokens in the first. On a cluster (TCP or MPI)
        each pass is one command to the workers and one exchange per seam for all its tokens (an exchange
        that carries_steps: each token's slot and position travel with it)."""
        slots = [r.slot for r in runs]
        if len(set(slots)) != len(slots):
            raise EngineError("a step takes at most one run per slot")
        ids = [np.asarray(r.token_ids, dtype=np.int64).reshape(-1) for r in runs]
        for run, run_ids in zip(runs, ids):
            if len(run_ids) == 0:
                raise EngineError(f"slot {run.slot}'s run needs at least one token")
            self._check(len(run_ids), int(run_ids.min()), int(run_ids.max()), run.pos, run.slot)
        if not self._runs_steps():
            return [self._forward_alone(run) for run in runs]
        dispatch.set_threads(self.nthreads)
        out = [np.empty((1 if r.last_only else len(i), self.vocab_size), np.float32) for r, i in zip(runs, ids)]
        done = [0] * len(runs)
        while any(d < len(i) for d, i in zip(done, ids)):
            taken = self._share_pass(ids, done)
            self._step_pass(runs, ids, done, taken, out)
            done = [d + n for d, n in zip(done, taken)]
        for run, run_ids in zip(runs, ids):
            self.slot_pos[run.slot] = run.pos + len(run_ids)
        return out

    def _runs_steps(self) -> bool:
        """Whether step() batches slots here: the node that looks up the tokens, alone or the root of a cluster
        whose exchange tells the workers each token's place."""
        return self.embedding is not None and (getattr(self.exchange, "adds_partials_as_computed", False)
                                               or getattr(self.exchange, "carries_steps", False))

    def _forward_alone(self, run: SlotRun) -> np.ndarray:
        if run.slot != 0:
            raise EngineError("this engine's exchange runs one sequence at a time: use slot 0 "
                              "(dllama-run serve --parallel 1)")
        return self.forward(run.token_ids, run.pos, run.last_only)

    @staticmethod
    def _share_pass(ids: list[np.ndarray], done: list[int]) -> list[int]:
        """How many of each run's remaining tokens go in the next pass: the shortest remainders first, so that
        decoded tokens never wait behind a prompt."""
        budget, taken = PREFILL_BATCH, [0] * len(ids)
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i]) - done[i]):
            taken[i] = min(len(ids[i]) - done[i], budget)
            budget -= taken[i]
        return taken

    def _step_pass(self, runs: Sequence[SlotRun], ids: list[np.ndarray], done: list[int], taken: list[int],
                   out: list[np.ndarray]) -> None:
        """One pass: tokens done[i]..+taken[i] of each run. The tokens whose logits are wanted go last (each
        token carries its own slot and position, so rows may go in any order) and the pass computes the
        lm_head of those rows only."""
        quiet, loud = [], []  # (run, first token, end token)
        for i, (run, n) in enumerate(zip(runs, taken)):
            a, b = done[i], done[i] + n
            if n == 0:
                continue
            if not run.last_only:
                loud.append((i, a, b))
            elif b < len(ids[i]):
                quiet.append((i, a, b))
            else:
                quiet.append((i, a, b - 1))
                loud.append((i, b - 1, b))
        order = [(i, a, b) for i, a, b in quiet + loud if b > a]
        token_ids = np.concatenate([ids[i][a:b] for i, a, b in order])
        places = Places(np.concatenate([np.arange(runs[i].pos + a, runs[i].pos + b) for i, a, b in order]),
                        np.concatenate([np.full(b - a, runs[i].slot) for i, a, b in order]))
        n_logits = sum(b - a for _, a, b in loud)
        x = np.array(self.embedding[token_ids], dtype=np.float32)
        self.exchange.begin(x, places, n_logits)
        logits = self.run_layers(x, places, None, n_logits)
        row = 0
        for i, a, b in loud:
            if runs[i].last_only:
                out[i][0] = logits[row]
            else:
                out[i][a:b] = logits[row:row + b - a]
            row += b - a

    def _forward_batch(self, ids: np.ndarray, pos: int, out: np.ndarray | None = None,
                       logits: str = "all") -> np.ndarray:
        x = np.array(self.embedding[ids], dtype=np.float32)  # the batch's one lookup of embedding rows
        self.exchange.begin(x, pos, logits)
        return self.run_layers(x, pos, out, logits)

    def run_layers(self, x: np.ndarray, pos: int | Places, out: np.ndarray | None = None,
                   logits: str | int = "all") -> np.ndarray:
        """The layer loop, the same on every node: x (T, dim) at positions pos.. -> logits (on the root;
        a worker's exchange returns its own slice). `out`: where the logits may go, if they can. `logits`
        "last" or "none" computes (and, on a cluster, gathers) only the last token's or none: a prompt's
        other tokens' logits are never used (model.LOGITS_ROWS)."""
        if getattr(self.exchange, "adds_partials_as_computed", False):
            computed = self.layers.whole_pass(x, pos, out, logits, self._q80_partials())
            if computed is not None:
                return self.exchange.gather_logits(computed)
        for layer in range(self.header.n_layers):
            self.exchange.reduce_into(x, self.layers.attention_block(layer, x, pos), layer, "attention")
            self.exchange.reduce_into(x, self.layers.ffn_block(layer, x), layer, "ffn")
        rows = logit_rows(logits, len(x))
        if rows == 0:
            return self.exchange.gather_logits(np.empty((0, 0), dtype=np.float32))
        return self.exchange.gather_logits(self.layers.logits(x[len(x) - rows:]))
