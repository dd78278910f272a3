"""Where errors leave the program: one `error:` line on stderr and an exit code.

The table ERROR_LINES says which errors are expected and how each is told in one line; an error
it does not name (a bug in dllama or a library: a numpy ValueError, a KeyError) keeps its
traceback. Commands wrap their work in `with edge(): ...` and never catch errors themselves.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

import typer

from dllama.errors import DllamaError

EXIT_ERROR = 1  # dllama-validate keeps 1 for "a check failed" and reports bad input with 2


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _os_error_line(e: BaseException) -> str:
    assert isinstance(e, OSError)
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


# error class -> its one line; the first class in the error's MRO that is listed here decides
ERROR_LINES: dict[type[BaseException], Callable[[BaseException], str]] = {
    DllamaError: _first_line,   # ours: raised where the fact is known, the message says the fix
    OSError: _os_error_line,    # the machine refused (disk full, permission, port in use): reason and file
}


def one_line(e: BaseException) -> str:
    for cls in type(e).__mro__:
        if cls in ERROR_LINES:
            return ERROR_LINES[cls](e)
    raise TypeError(f"{type(e).__name__} is not an expected error")


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    """Progress and notes: stderr, so that stdout holds only the result."""
    print(message, file=sys.stderr, flush=True)


def stop_quietly() -> NoReturn:
    """Ctrl-C in a command that streams text: a note, and the shell's 128 + SIGINT."""
    note("\ninterrupted")
    raise typer.Exit(130)


@contextmanager
def terminations_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a kill, a closed terminal) stop the command as Ctrl-C does, so that the
    same cleanups run (atomic_output removes its temp file); the old handlers come back after."""
    def interrupt(signum, frame) -> NoReturn:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def edge(code: int = EXIT_ERROR, interrupted: Callable[[], NoReturn] | None = None) -> Iterator[None]:
    """Expected errors inside become `error: ...` and exit `code`; Ctrl-C calls `interrupted`."""
    try:
        yield
    except tuple(ERROR_LINES) as e:
        fail(one_line(e), code)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        interrupted()


class CliError(DllamaError):
    """Bad input found at the command line itself (a missing file, options that do not go together)."""
