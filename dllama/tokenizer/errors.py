"""Errors of the runtime tokenizer (one place, so every module can raise them)."""


class TokenizerError(ValueError):
    """A request the tokenizer cannot serve (bad mode, id outside the vocabulary, unusable embedding)."""
