"""A command line whose first command runs when no command is named (dllama-validate's check)."""
from __future__ import annotations

from dllama.cli.command_group import DllamaGroup


class DefaultCommandGroup(DllamaGroup):
    """A group whose arguments go to its first command unless they start with another command's
    name or one of the group's own options (--help, --version, completion): `dllama-validate
    MODEL.m TOKENIZER.t` beside `dllama-validate reference ...`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        default = next(iter(self.commands))
        own = {name for p in self.get_params(ctx) for name in p.opts}
        if not args or (args[0] not in self.commands and args[0] not in own):
            args = [default, *args]
        return super().parse_args(ctx, args)
