"""The command line's one edge: our errors become one `error:` line, anything else keeps its traceback."""
from __future__ import annotations

import pytest
import typer

from dllama.cli.edge import ERROR_LINES, edge
from dllama.errors import DllamaError
from dllama.formats import FormatError
from dllama.runtime.distributed.root import WorkerError


@pytest.mark.parametrize("error, line", [
    (FormatError("model.m is truncated\nsecond line"), "error: model.m is truncated"),
    (WorkerError("worker pi1:9999 (node 1): refused"), "error: worker pi1:9999 (node 1): refused"),
    (FileNotFoundError(2, "No such file or directory", "out/x.m"), "error: No such file or directory (out/x.m)"),
])
def test_an_expected_error_is_one_line_and_the_exit_code(capsys, error, line):
    with pytest.raises(typer.Exit) as exit_info:
        with edge(code=2):
            raise error
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == line + "\n"


def test_an_error_that_is_not_ours_keeps_its_traceback():
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        with edge():
            raise ValueError("operands could not be broadcast together")


def test_every_error_we_raise_has_the_one_root():
    import dllama.cli.dllama_convert  # noqa: F401 (imports every error class the commands can meet)
    import dllama.cli.dllama_run  # noqa: F401
    import dllama.cli.dllama_validate  # noqa: F401
    import dllama.runtime.serve.app  # noqa: F401

    ours = [c for c in _subclasses(Exception) if c.__module__.startswith("dllama.") and not issubclass(c, Warning)]
    assert ours and all(issubclass(c, DllamaError) for c in ours), [c for c in ours if not issubclass(c, DllamaError)]
    assert DllamaError in ERROR_LINES


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out
