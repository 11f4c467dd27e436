"""`devstral pull`: the explicit download of a model from the Hugging Face hub."""

from __future__ import annotations

import typer

from devstral.cli.app import app


@app.command()
def pull(spec: str = typer.Argument(..., help="org/repo, or org/repo:QUANT for exactly one GGUF quant."),
         mmproj: bool = typer.Option(True, "--mmproj/--no-mmproj",
                                     help="With :QUANT, also fetch the repo's vision projector (mmproj GGUF: F16, "
                                          "else BF16, F32) beside the model, where run/chat/serve find it.")) -> None:
    """Download a model, or update a cached one (the only command that reaches the network besides
    --model org/repo when the model is not cached yet)."""
    from devstral.formats.hub import download

    print(download(spec, refresh=True, mmproj=mmproj))
