"""`devstral chat`: an interactive REPL with multi-line input, /reset, /system and tok/s."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from devstral.cli.app import app
from devstral.cli.options import (
    BACKEND_OPTION,
    GPU_MEMORY_OPTION,
    MMPROJ_OPTION,
    QUANTIZE_ON_LOAD,
    SPECULATIVE_OPTION,
    TENSOR_PARALLEL_OPTION,
    THREADS_OPTION,
    VISION_OPTION,
    apply_threads,
    load_llm,
    sampling_from_flags,
)

HELP = ("Type a message and press Enter. End a line with \\ to continue on the next line, or wrap a block in "
        '""" … """. Commands: /reset, /system TEXT, /image PATH (for the next message), /exit. Ctrl-C stops the current answer; Ctrl-D quits.')


def read_message(console: Console) -> str | None:
    """One user message; None on EOF. Supports trailing-backslash and triple-quote blocks."""
    lines: list[str] = []
    block = False
    while True:
        try:
            line = input(">>> " if not lines else "... ")
        except EOFError:
            return None if not lines else "\n".join(lines)
        except KeyboardInterrupt:  # like a shell: Ctrl-C at the prompt drops the line, Ctrl-D quits
            console.print("")
            lines, block = [], False
            continue
        if not lines and line.strip() == '"""':
            block = True
            continue
        if block:
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


@app.command()
def chat(
    model: str = typer.Option(None, "--model", "-m", help="Model folder, .gguf file, org/repo, or 'nano'."),
    adapter: Path = typer.Option(None, "--adapter"),
    system: str = typer.Option(None, "--system"),
    no_system: bool = typer.Option(False, "--no-system"),
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", min=0),
    temperature: float = typer.Option(None, "--temperature", min=0.0),
    top_k: int = typer.Option(None, "--top-k", min=0),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(None, "--min-p", min=0.0, max=1.0),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty", min=0.0),
    seed: int = typer.Option(None, "--seed"),
    ctx_size: int = typer.Option(None, "--ctx-size", "-c", min=1),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    threads: int = THREADS_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    backend: str = BACKEND_OPTION,
    gpu_memory_fraction: float = GPU_MEMORY_OPTION,
    quantize_on_load: str = QUANTIZE_ON_LOAD,
    mmproj: Path = MMPROJ_OPTION,
    vision: bool = VISION_OPTION,
    tensor_parallel: int = TENSOR_PARALLEL_OPTION,
) -> None:
    """Chat with a model in the terminal."""
    from devstral.errors import DevstralError
    from devstral.prompt.images import file_part, why_no_images

    console = Console(stderr=True)
    apply_threads(threads)
    llm = load_llm(model, adapter=adapter, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                   ctx_size=ctx_size, system=system, no_system=no_system, speculative=speculative,
                   gpu_memory_fraction=gpu_memory_fraction, backend=backend,
                   quantize_on_load=quantize_on_load, mmproj=mmproj, vision=vision,
                   tensor_parallel=tensor_parallel)
    params = sampling_from_flags(llm, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    console.print(f"[dim]{HELP}[/dim]")
    history: list[dict] = []
    pending_images: list[dict] = []  # /image parts that go with the next message
    while True:
        text = read_message(console)
        if text is None:
            break
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit", "/bye"):
            break
        if text.strip() == "/reset":
            history.clear()
            console.print("[dim]conversation cleared[/dim]")
            continue
        if text.startswith("/system"):
            llm.tokenizer.default_system_prompt = text[len("/system"):].strip() or None
            history.clear()
            console.print("[dim]system prompt set; conversation cleared[/dim]")
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            if not path:
                console.print("[red]error:[/red] /image needs a file path")
            elif getattr(llm, "vision", None) is None:
                console.print(f"[red]error:[/red] {why_no_images(llm.tokenizer)}")
            else:
                try:
                    pending_images.append(file_part(path))
                    console.print(f"[dim]image attached to your next message: {path}[/dim]")
                except DevstralError as e:
                    console.print(f"[red]error:[/red] {e}")
            continue
        content = [*pending_images, {"type": "text", "text": text}] if pending_images else text
        pending_images = []
        history.append({"role": "user", "content": content})
        answer: list[str] = []
        llm.last_timings = {}
        try:
            stream = llm.stream_chat(history, sampling=params)
            for choice in stream:
                piece = choice["delta"].get("content")
                if piece:
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            message = stream.result.message
        except KeyboardInterrupt:
            console.print("\n[dim](stopped)[/dim]")
            message = {"role": "assistant", "content": "".join(answer)}
        except DevstralError as e:
            history.pop()
            console.print(f"\n[red]error:[/red] {e}")
            continue
        sys.stdout.write("\n")
        for call in message.get("tool_calls") or []:
            console.print(f"[cyan][tool call][/cyan] {call['function']['name']}({call['function']['arguments']})")
        if message.get("content") or message.get("tool_calls"):
            history.append({k: v for k, v in message.items() if v is not None})
        else:
            history.pop()  # nothing was said: forget the question too, so turns keep alternating
        t = llm.last_timings
        if t:
            console.print(f"[dim]{t.get('completion_tokens', 0)} tokens · prefill {t.get('prefill_tok_s', 0):.1f} "
                          f"tok/s · decode {t.get('decode_tok_s', 0):.1f} tok/s[/dim]")
