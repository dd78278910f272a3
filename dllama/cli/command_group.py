"""What every dllama command line shares: `--version`, shell completion, one spelling per option, and
usage errors told as one `error:` line like every other error (edge.py).

    app = new_app(help="...")                      # dllama-convert
    app = new_app(help="...", cls=ModelFirstGroup)  # dllama-run: `dllama-run MODEL ...` beside `dllama-run chat`
"""
from __future__ import annotations

import sys

import typer
import typer.core
from typer.core import TyperGroup

try:  # newer typer carries its own copy of click: its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
    from typer._click.shell_completion import CompletionItem
except ImportError:  # pragma: no cover - typer on click
    from click import exceptions as click_exceptions
    from click.shell_completion import CompletionItem

# an older spelling still accepted, hidden from --help: each option has one name across the commands
HIDDEN_ALIASES = {"--nthreads": "--threads"}
RUN_MODEL = "--run-model"  # where ModelFirstGroup puts dllama-run's MODEL argument (a hidden option of generate)


def version() -> str:
    from dllama import __version__

    return __version__


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(f"{ctx.find_root().info_name} {version()}")
        raise typer.Exit()


VERSION = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="print the version and exit")


def usage_error_line(e) -> str:
    """Click's "Missing option '--model'." -> "missing option '--model'; see `dllama-run chat --help`"."""
    message = e.format_message().strip().rstrip(".")
    message = message[:1].lower() + message[1:]
    where = getattr(e, "ctx", None)
    return f"{message}; see `{where.command_path} --help`" if where is not None else message


class DllamaGroup(TyperGroup):
    """A typer group with the hidden aliases and `error:` usage errors (exit 2, like click); --version is
    VERSION, an option of the app's callback."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, [_unalias(a) for a in args])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click_exceptions.ClickException as e:
            print(f"error: {usage_error_line(e)}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _unalias(arg: str) -> str:
    name, eq, value = arg.partition("=")
    return HIDDEN_ALIASES[name] + eq + value if name in HIDDEN_ALIASES else arg


class ModelFirstGroup(DllamaGroup):
    """`dllama-run MODEL --prompt ...` beside `dllama-run chat MODEL`: the group's first positional argument,
    unless it names a command, is the MODEL of the group's own command (generate), passed as RUN_MODEL."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        i = self._first_positional(ctx, [_unalias(a) for a in args])
        if i is not None and args[i] not in self.commands:
            args = [*args[:i], RUN_MODEL, args[i], *args[i + 1:]]
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx, incomplete: str) -> list:
        """`dllama-run <TAB>`: the commands, and the stored models' names."""
        from dllama.cli.options import complete_model

        items = super().shell_complete(ctx, incomplete)
        return items + ([] if incomplete.startswith("-") else [CompletionItem(n) for n in complete_model(incomplete)])

    def _first_positional(self, ctx, args: list[str]) -> int | None:
        takes_value = {name: not (p.is_flag or p.count) for p in self.get_params(ctx)
                       if p.param_type_name == "option" for name in p.opts + p.secondary_opts}
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                return None
            if not arg.startswith("-") or arg == "-":
                return i
            if arg not in takes_value and "=" not in arg:
                return None  # an option the group does not know: leave the error to click
            i += 2 if takes_value.get(arg) else 1
        return None


def new_app(help: str, cls: type[DllamaGroup] = DllamaGroup, **settings) -> typer.Typer:
    """A command line in the house style: plain help (no rich boxes), shell completion; its callback takes
    VERSION."""
    return typer.Typer(cls=cls, help=help, rich_markup_mode=None, add_completion=True, pretty_exceptions_enable=False,
                       **settings)
