"""The typer application every `devstral` subcommand registers on.

Each file in this folder holds one command (or one group) and decorates it with `@app.command()`;
`devstral.cli.main` imports them all. Keep imports of torch and friends inside the command bodies
so that `devstral --help` stays fast.
"""

import os

import typer

app = typer.Typer(
    name="devstral",
    help="Run, serve, fine-tune and use Mistral's Devstral models locally and privately.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from devstral import __version__

        typer.echo(f"devstral {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
    offline: bool = typer.Option(False, "--offline",
                                 help="Never reach the Hugging Face hub: org/repo models come from the local "
                                      "cache or fail (same as DEVSTRAL_OFFLINE=1)."),
) -> None:
    """Run, serve, fine-tune and use Mistral's Devstral models locally and privately."""
    if offline:
        # The environment, so that every part (and huggingface_hub itself) sees it.
        os.environ["DEVSTRAL_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
