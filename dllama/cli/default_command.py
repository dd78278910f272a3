"""A command line whose first command runs when no command is named (dllama-validate's check)."""
from __future__ import annotations

import click
from typer.core import TyperGroup


class DefaultCommandGroup(TyperGroup):
    """A group whose arguments go to its first command unless they start with another command's
    name: `dllama-validate MODEL.m TOKENIZER.t` beside `dllama-validate reference ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        default = next(iter(self.commands))
        if not args or args[0] not in self.commands:
            args = [default, *args]
        return super().parse_args(ctx, args)
