"""`python -m dllama.samples`: fetch the sample models into the cache, one path a line on stdout."""
from __future__ import annotations

from typing import List, Optional

import typer

from dllama.cli.edge import CliError, edge
from dllama.samples import SAMPLES, fetch

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command()
def fetch_command(
    names: Optional[List[str]] = typer.Argument(None, help=f"which ({', '.join(SAMPLES)}; default all)"),
) -> None:
    """Fetch the sample models into the cache."""
    with edge():
        for name in names or list(SAMPLES):
            if name not in SAMPLES:
                raise CliError(f"unknown sample {name!r}: use one of {', '.join(SAMPLES)}")
            print(fetch(SAMPLES[name], quiet=True))


def main() -> None:
    app(prog_name="python -m dllama.samples")
