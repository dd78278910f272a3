"""`dllama-run list` and `dllama-run rm NAME`: the local model store (dllama/store.py, docs/STORE.md)."""
from __future__ import annotations

import json

import typer

from dllama import store
from dllama.cli import options
from dllama.cli.edge import edge, note


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def list_command(as_json: bool = options.AS_JSON) -> None:
    """List the models in the store (converted by `dllama-run MODEL`), with their size and source.

    Example: dllama-run list
    """
    with edge():
        found = store.entries()
        rows = [{"name": e.ref, "quant": e.quant, "size": e.size, "source": e.info.get("source"),
                 "created": e.info.get("created"), "folder": str(e.folder)} for e in found]
    if as_json:
        typer.echo(json.dumps({"store": str(store.models_dir()), "models": rows}, indent=2))
        return
    if not rows:
        note(f"no models in {store.models_dir()} yet: `dllama-run MODEL --prompt ...` converts one into it")
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'NAME':<{width}}  {'SIZE':>11}  SOURCE")
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {_mib(r['size']):>11}  {r['source']}")


def rm_command(name: str = typer.Argument(..., metavar="NAME",
                                          help="a stored model: NAME (every quant) or NAME:QUANT")) -> None:
    """Remove a model from the store.

    Example: dllama-run rm smollm2-135m-instruct:q80
    """
    with edge():
        removed = store.remove(name)
    for e in removed:
        note(f"removed {e.ref} ({e.folder})")
