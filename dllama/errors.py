"""The root of every error dllama raises on purpose.

An error of ours is raised where the fact is known, with the fix in its message; only the
command-line edge (dllama.cli.edge) turns it into one `error:` line and an exit code. Anything
else that escapes is a bug and keeps its traceback.

Most subclasses also derive from the builtin they replaced (ValueError, RuntimeError), so
callers that caught those still do.
"""
from __future__ import annotations


class DllamaError(Exception):
    """A failure dllama foresaw: bad input, a broken file, a lost worker. Its message is one line
    that says what to do."""


class FormatError(DllamaError, ValueError):
    """A `.m` or `.t` file (or a value headed for one) breaks the format (dllama.formats)."""


class TokenizerError(DllamaError, ValueError):
    """A request the tokenizer cannot serve (bad mode, id outside the vocabulary, unusable embedding)."""
