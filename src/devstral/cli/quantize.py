"""`devstral quantize`: a model folder or GGUF -> a quantized, llama.cpp-compatible GGUF."""

from __future__ import annotations

from pathlib import Path

import typer

from devstral.cli.app import app
from devstral.cli.options import THREADS_OPTION, apply_threads


@app.command()
def quantize(
    source: str = typer.Argument(..., help="HF or Mistral model folder, a .gguf to requantize, org/repo or nano."),
    out: Path = typer.Argument(..., help="Output .gguf file (written atomically)."),
    qtype: str = typer.Option("Q4_K_M", "--type", "-t",
                              help="Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, Q4_0, Q5_0, F16, BF16 or F32."),
    imatrix: Path | None = typer.Option(None, "--imatrix", help="llama.cpp importance matrix (.gguf or .dat)."),
    tensor_type: list[str] = typer.Option([], "--tensor-type",
                                          help="REGEX=TYPE override, as llama-quantize (repeatable)."),
    name: str | None = typer.Option(None, "--name", help="general.name written into the file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    threads: int = THREADS_OPTION,
    modelfile: bool = typer.Option(False, "--modelfile",
                                   help="Also write OUT's Ollama Modelfile (OUT with .Modelfile for .gguf)."),
    mmproj: bool = typer.Option(True, "--mmproj/--no-mmproj",
                                help="For a model with a vision tower, also write its projector as "
                                     "mmproj-OUT (F16; llama.cpp's and devstral's --mmproj)."),
) -> None:
    """Quantize SOURCE into OUT with llama.cpp's per-tensor recipe for --type."""
    import sys
    import time

    from devstral.errors import DevstralError
    from devstral.formats.gguf_write import export_gguf
    from devstral.loader import resolve_model
    from devstral.tmpfiles import remove_stale

    apply_threads(threads)
    remove_stale(out.parent)  # what a killed quantize left beside its output (gigabytes for a real model)
    source = resolve_model(source, fetch_mmproj=False)  # the same resolution as --model: paths, org/repo, "nano"
    if out.exists() and out.resolve() == source.resolve():
        raise DevstralError(f"{out}: the output would overwrite the input")
    start = time.perf_counter()
    path = export_gguf(source, out, qtype, imatrix=imatrix, tensor_types=tensor_type, name=name,
                       progress=progress)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e9:.3f} GB, {qtype.upper()}) in {seconds:.1f} s", file=sys.stderr)
    if mmproj and source.is_dir():
        from devstral.formats.gguf_mmproj import export_mmproj

        projector = export_mmproj(source, path.with_name(f"mmproj-{path.name}"), name=name)
        if projector is not None:
            print(f"wrote {projector} (vision projector, F16): pass it with --mmproj", file=sys.stderr)
    if modelfile:
        from devstral.cli.options import write_ollama_modelfile

        written = write_ollama_modelfile(path, path.with_suffix(".Modelfile"), source)
        print(f"wrote {written}: ollama create NAME -f {written}", file=sys.stderr)
