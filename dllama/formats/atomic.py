"""Writing without leaving half-written files behind."""
from __future__ import annotations

import fcntl
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from dllama.errors import FormatError


def current_umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (or a kernel before 4.7): the only other way to read it
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, fix: str = "choose a writable --output-dir") -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, rename it over `path` only on success (after fsync); `fix` ends the
    error of a folder that cannot be written.

    The temp file is locked while it is written: a run killed with SIGKILL leaves it unlocked, and
    the next write of the same `path` removes it; a live writer's (locked) temp file survives."""
    path = Path(path)
    remove_stale_partials(path)
    fd, tmp = _locked_temp(path, fix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600: the mode any other new file would get
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name says the file is whole
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _locked_temp(path: Path, fix: str) -> tuple[int, str]:
    while True:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        except OSError as e:
            raise FormatError(f"cannot write to {path.parent}: {e.strerror}; {fix}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # another run's cleanup may have taken it between mkstemp and flock: then take another
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the temp files of earlier writes of `path` whose writer is gone (their lock is free)."""
    own = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.partial$")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.partial"):
        if not own.match(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(candidate)
            removed.append(candidate)
        except OSError:  # locked: a live write
            pass
        finally:
            os.close(fd)
    return removed
