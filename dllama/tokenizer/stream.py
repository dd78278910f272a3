"""Incremental decoding that never emits a broken utf-8 character."""
from __future__ import annotations

from typing import Callable

from dllama.tokenizer.cpp_tokenizer import ReferenceDecoder

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Text of a growing id list, piece by piece, as Hugging Face decodes the whole list.

    Decoding a window of recent ids in the context of the previous ones (the method of
    text-generation-inference) keeps decoder rules such as sentencepiece's leading-space strip
    right; a window whose text ends in U+FFFD is an unfinished character (a byte-fallback
    piece, or a byte-level token holding part of one) and waits for the next id.
    """

    def __init__(self, decode: Callable[[list[int]], str], skip_first: int | None = None):
        self._decode = decode
        self._skip_first = skip_first  # a leading bos decodes to nothing, as in Tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0    # ids before this have been emitted

    def push(self, token: int) -> str:
        if not self.ids and self._skip_first is not None and token == self._skip_first:
            self._skip_first = None
            return ""
        self._skip_first = None
        self.ids.append(int(token))
        context = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(context) and not text.endswith(REPLACEMENT) and text.startswith(context):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(context):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        context = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(context):] if text.startswith(context) else text


class ReferenceStreamDecoder:
    """The reference runtime's decode, one id at a time: what it prints for each token."""

    def __init__(self, decoder: ReferenceDecoder):
        self._decoder = decoder

    def push(self, token: int) -> str:
        return self._decoder.push(token).decode("utf-8", "replace")

    def flush(self) -> str:
        # the reference runtime never prints bytes still buffered when generation stops
        return ""
