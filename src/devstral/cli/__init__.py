"""Entry point of the `devstral` command.

User errors (DevstralError, bad flags) become one line on stderr and exit code 2; nothing else is
caught, so real bugs keep their traceback.
"""

import importlib
import pkgutil
import sys

import typer
import typer.main

from devstral.cli.app import app
from devstral.errors import DevstralError


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in ("app",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def _hide_type(param) -> None:
    if getattr(param, "param_type_name", "") == "option" and getattr(param, "is_flag", False):
        param.display_type_rich = lambda ctx: None  # typer has no setting for it; shadow the method


def _hide_flag_types(command) -> None:
    """On/off flags take no value: show no `<bool>` type for them (--help included) in --help."""
    for param in command.params:
        _hide_type(param)
    make_help_option = command.get_help_option  # made per context, so wrapped rather than edited

    def get_help_option(ctx):
        option = make_help_option(ctx)
        if option is not None:
            _hide_type(option)
        return option

    command.get_help_option = get_help_option
    for sub in (getattr(command, "commands", None) or {}).values():
        _hide_flag_types(sub)


def build_command():
    """The (typer) click command behind `devstral`, every subcommand registered."""
    _register_commands()
    command = typer.main.get_command(app)
    _hide_flag_types(command)
    return command


def main(argv: list[str] | None = None) -> int:
    command = build_command()
    try:
        rv = command(args=argv, prog_name="devstral", standalone_mode=False)
    except DevstralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: bad flags and values
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {where}{' '.join(message.split())}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
