"""The reference C++ runtime's tokenizer (distributed-llama src/tokenizer.cpp), bit for bit.

FORMAT.md §4.1: ids below bos_id are "regular", ids from bos_id up "special"; encoding walks
the text's bytes, lets a special token that is a prefix win, accumulates bytes until they form
a regular token, then greedily merges the adjacent pair whose concatenation is the regular token
with the highest score. No pre-tokenizer. The C code works on NUL-terminated strings, so every
comparison here uses the bytes up to the first NUL, as strcmp/strncmp/snprintf("%s") would.
"""
from __future__ import annotations

import heapq

from dllama.errors import DllamaError
from dllama.formats import TokenizerFile


class ReferenceRuntimeAbort(DllamaError, ValueError):
    """Input on which the reference runtime hits an assert and aborts."""


NO_MERGE_SCORE = -1e10  # `best_score` starts here in the C code; a merge must beat it strictly


def c_string(data: bytes) -> bytes:
    """What C sees of `data`: the bytes before the first NUL."""
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def str_buffer_size(max_token_length: int) -> int:
    # Tokenizer::Tokenizer: room for two tokens (at least two 4-byte utf-8 chars) + NUL + 2
    return max(max_token_length * 2, 8) + 3


class RegularVocabulary:
    """The C `regularVocab`: ids [0, bos_id) sorted by strcmp, searched with glibc's bsearch.

    Duplicated strings (sentencepiece's "<0x20>" and "▁" both become b" ") make the choice of
    id depend on the sort and the search; glibc's qsort is a stable merge sort and its bsearch
    halves [lo, hi) at (lo + hi) // 2, so we do the same to pick the same id.
    """

    def __init__(self, tokens: list[bytes], regular_count: int):
        keyed = sorted(((c_string(tokens[i]), i) for i in range(max(regular_count, 0))), key=lambda kv: kv[0])
        self._keys = [k for k, _ in keyed]
        self._ids = [i for _, i in keyed]
        self._cache: dict[bytes, int] = {}

    def find(self, piece: bytes) -> int:
        """Tokenizer::findRegularToken: an id whose string equals `piece`, or -1."""
        found = self._cache.get(piece)
        if found is None:
            found = self._cache[piece] = self._bsearch(piece)
        return found

    def _bsearch(self, piece: bytes) -> int:
        lo, hi = 0, len(self._keys)
        while lo < hi:
            mid = (lo + hi) // 2
            key = self._keys[mid]
            if piece < key:
                hi = mid
            elif piece > key:
                lo = mid + 1
            else:
                return self._ids[mid]
        return -1


class ReferenceEncoder:
    """Tokenizer::encode of the reference runtime."""

    def __init__(self, tf: TokenizerFile):
        self.tf = tf
        self.bos_id = tf.bos_id
        self.tokens_c = [c_string(t) for t in tf.tokens]
        self.scores = [float(s) for s in tf.scores]
        self.regular = RegularVocabulary(tf.tokens, tf.bos_id)
        max_len = tf.max_token_length or max(len(t) for t in tf.tokens)
        self.buffer_size = str_buffer_size(max_len)
        # findSpecialTokenStartWith scans ids bos_id.. in order and takes the first prefix match
        # (not the longest). strncmp stops at a NUL, so a token with an embedded NUL could only
        # match at the very end of the text, after which the C code reads past it: we never match it.
        self.specials = [(i, tf.tokens[i]) for i in range(max(tf.bos_id, 0), tf.vocab_size)
                         if tf.tokens[i] and b"\0" not in tf.tokens[i]]
        self._specials_by_first_byte: dict[int, list[tuple[int, bytes]]] = {}
        for tid, tok in self.specials:
            self._specials_by_first_byte.setdefault(tok[0], []).append((tid, tok))

    def encode(self, text: str | bytes, add_bos: bool, add_special_tokens: bool = True) -> list[int]:
        data = c_string(text.encode("utf-8") if isinstance(text, str) else bytes(text))
        ids = [self.bos_id] if add_bos else []
        ids += self._initial_tokens(data, add_special_tokens)
        return self._merge(ids)

    def _special_at(self, data: bytes, pos: int) -> int:
        for tid, tok in self._specials_by_first_byte.get(data[pos], ()):
            if data.startswith(tok, pos):
                return tid  # candidates are in id order, so this is the first in the C scan
        return -1

    def _initial_tokens(self, data: bytes, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        pending = bytearray()
        pos = 0
        while pos < len(data):
            if add_special_tokens:
                tid = self._special_at(data, pos)
                if tid >= 0:
                    ids.append(tid)
                    pos += len(self.tf.tokens[tid])
                    continue
            pending.append(data[pos])
            pos += 1
            if len(pending) >= self.buffer_size:
                raise ReferenceRuntimeAbort(
                    f"bytes {bytes(pending[:16])!r}... form no token within {self.buffer_size} bytes: "
                    "the reference runtime aborts (assert strLen < strBufferSize)")
            tid = self.regular.find(bytes(pending))
            if tid != -1:
                ids.append(tid)
                pending.clear()
        if pending:
            raise ReferenceRuntimeAbort(
                f"the text ends with bytes {bytes(pending)!r} that form no regular token: the reference runtime "
                "aborts (assert strLen == 0); its vocabulary below bos_id lacks byte tokens")
        return ids

    def _pair_merge(self, left: int, right: int) -> tuple[float, int] | None:
        # snprintf(strBuffer, strBufferSize, "%s%s", ...) truncates to strBufferSize - 1 bytes
        joined = (self.tokens_c[left] + self.tokens_c[right])[:self.buffer_size - 1]
        tid = self.regular.find(joined)
        if tid == -1 or not self.scores[tid] > NO_MERGE_SCORE:
            return None
        return self.scores[tid], tid

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy merging; the C loop takes the leftmost pair of the highest score each round.

        A heap ordered by (-score, position) picks the same pair: positions keep their relative
        order as nodes are unlinked, so the smallest position among the best is the leftmost.
        """
        n = len(ids)
        if n < 2:
            return ids
        tokens = list(ids)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            self._push_pair(heap, tokens, i, i + 1)
        while heap:
            neg_score, i, left_tok, right_tok, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or tokens[i] != left_tok or tokens[j] != right_tok:
                continue  # stale entry: the pair changed since it was pushed
            tokens[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                self._push_pair(heap, tokens, prv[i], i)
            if nxt[i] >= 0:
                self._push_pair(heap, tokens, i, nxt[i])
        return [tokens[i] for i in range(n) if alive[i]]

    def _push_pair(self, heap: list, tokens: list[int], i: int, j: int) -> None:
        found = self._pair_merge(tokens[i], tokens[j])
        if found is not None:
            score, merged = found
            heapq.heappush(heap, (-score, i, tokens[i], tokens[j], merged))


class ReferenceDecoder:
    """Tokenizer::decode + detokUtf8: pieces are buffered until they form utf-8; invalid bytes
    become U+FFFD with the C code's recovery quirks (an invalid tail stays buffered silently)."""

    def __init__(self, tf: TokenizerFile):
        self.tf = tf
        self.eos = set(tf.eos_ids)
        max_len = tf.max_token_length or max(len(t) for t in tf.tokens)
        self.buffer_size = str_buffer_size(max_len)
        self.pending = b""

    def push(self, token: int) -> bytes:
        """The bytes the C decode() returns for `token` (b"" for nullptr)."""
        if token == self.tf.bos_id:
            return b""
        if token in self.eos:
            return c_string(self.pending)  # returns strBuffer as is and keeps it
        piece = self.tf.tokens[token]
        if len(self.pending) + len(piece) + 1 >= self.buffer_size:
            raise ReferenceRuntimeAbort(
                f"{len(self.pending)} undecodable bytes are buffered before token {token}: the reference runtime "
                "aborts (assert strBufferPos + pieceLen + 1 < strBufferSize)")
        out, self.pending = detok_utf8(self.pending + piece)
        return out


def detok_utf8(buffer: bytes) -> tuple[bytes, bytes]:
    """Tokenizer::detokUtf8 on the C string in `buffer`: (bytes emitted, bytes kept buffered)."""
    src = c_string(buffer)
    out = bytearray()
    checkpoint = checkpoint_src = 0  # checkpoint is an offset into `out`
    expect = 0
    i = 0
    while i < len(src):
        c = src[i]
        recover = False
        if expect:
            if c & 0xC0 == 0x80:
                out.append(c)
                i += 1
                expect -= 1
            else:
                recover = True
        elif c <= 0x7F:
            out.append(c)
            i += 1
        elif 0xC0 <= c <= 0xDF:
            out.append(c)
            i += 1
            expect = 1
        elif 0xE0 <= c <= 0xEF:
            out.append(c)
            i += 1
            expect = 2
        elif 0xF0 <= c <= 0xF7:
            out.append(c)
            i += 1
            expect = 3
        else:
            recover = True
        if not recover:
            if not expect:
                checkpoint, checkpoint_src = len(out), i
        else:
            if expect:
                expect = 0  # re-read this byte as the start of a new character
            else:
                i += 1
            del out[checkpoint:]
            out += b"\xef\xbf\xbd"  # checkpoint is not advanced: the C code drops it if nothing valid follows
    kept = src[checkpoint_src:i] if i > checkpoint_src else b""
    return bytes(out[:checkpoint]), kept
