"""Errors of the runtime tokenizer (one place, so every module can raise them)."""

from dllama.errors import DllamaError


class TokenizerError(DllamaError, ValueError):
    """A request the tokenizer cannot serve (bad mode, id outside the vocabulary, unusable embedding)."""
