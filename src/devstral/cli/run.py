"""`devstral run`: one prompt in, the model's answer out (streamed, or as one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

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


@app.command()
def run(
    prompt: str = typer.Argument(None, help="The prompt; read from stdin when omitted."),
    model: str = typer.Option(None, "--model", "-m", help="Model folder, .gguf file, org/repo, or 'nano'."),
    adapter: Path = typer.Option(None, "--adapter", help="A LoRA adapter folder (PEFT format) to apply."),
    system: str = typer.Option(None, "--system", help="System prompt (overrides SYSTEM_PROMPT.txt)."),
    no_system: bool = typer.Option(False, "--no-system", help="Send no system prompt at all."),
    raw: bool = typer.Option(False, "--raw", help="Plain text after one BOS, no chat template."),
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", min=0, help="Stop after N new tokens."),
    temperature: float = typer.Option(None, "--temperature", min=0.0),
    top_k: int = typer.Option(None, "--top-k", min=0),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0),
    min_p: float = typer.Option(None, "--min-p", min=0.0, max=1.0),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty", min=0.0),
    repeat_last_n: int = typer.Option(None, "--repeat-last-n", min=-1),
    seed: int = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ctx_size: int = typer.Option(None, "--ctx-size", "-c", min=1, help="Context window in tokens."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype",
                                        help="auto, bf16, fp16, fp32, fp8 (CUDA), q8_0 or q4_0."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    threads: int = THREADS_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    backend: str = BACKEND_OPTION,
    gpu_memory_fraction: float = GPU_MEMORY_OPTION,
    quantize_on_load: str = QUANTIZE_ON_LOAD,
    tensor_parallel: int = TENSOR_PARALLEL_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    image: list[Path] = typer.Option(None, "--image", help="An image (PNG, JPEG, WebP, GIF, BMP) shown to a vision "
                                     "model before the prompt; repeatable."),
    mmproj: Path = MMPROJ_OPTION,
    vision: bool = VISION_OPTION,
) -> None:
    """Generate a completion for PROMPT (chat template by default, --raw for plain text)."""
    from devstral.errors import DevstralError
    from devstral.prompt.images import file_part

    if image and raw:
        raise DevstralError("--image needs the chat template; it cannot go with --raw")
    images = [file_part(path) for path in image or []]  # a bad file fails before the model loads
    if prompt is None:
        if sys.stdin.isatty():
            raise typer.BadParameter("give a PROMPT argument or pipe one on stdin", param_hint="PROMPT")
        prompt = _read_stdin()
    apply_threads(threads)
    llm = load_llm(model, adapter=adapter, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                   ctx_size=ctx_size, system=system, no_system=no_system, speculative=speculative,
                   gpu_memory_fraction=gpu_memory_fraction, backend=backend,
                   quantize_on_load=quantize_on_load, mmproj=mmproj, vision=vision,
                   tensor_parallel=tensor_parallel)
    params = sampling_from_flags(llm, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                                 stop=stop)
    if raw:
        completion_stream = llm.stream(llm.encode_prompt(prompt), params)
        if as_json:
            c = llm.generate(llm.encode_prompt(prompt), params)
            _print_json(c.text, c.prompt_token_ids, c.token_ids, c.finish_reason, c.usage, c.timings)
            return
        for step in completion_stream:
            _write(step.text)
        _write("\n")
        return
    content = [*images, {"type": "text", "text": prompt}] if images else prompt
    stream = llm.stream_chat([{"role": "user", "content": content}], sampling=params)
    for choice in stream:
        if not as_json:
            _write(choice["delta"].get("content") or "")
    r = stream.result
    calls = r.message.get("tool_calls") or []
    if as_json:
        _print_json(r.message.get("content") or "", r.prompt_token_ids, r.token_ids, r.finish_reason, r.usage,
                    r.timings, tool_calls=calls)
        return
    _write("\n")
    for call in calls:  # a model asked to call a tool: show the structured call
        _write(f"[tool call] {call['function']['name']}({call['function']['arguments']})\n")


def _read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    except UnicodeDecodeError as e:
        from devstral.errors import DevstralError

        raise DevstralError(f"stdin: the prompt is not UTF-8 text (invalid byte at offset {e.start})") from None


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _print_json(text, prompt_ids, ids, finish, usage, timings, tool_calls=None) -> None:
    out = {"text": text, "prompt_token_ids": prompt_ids, "token_ids": ids, "finish_reason": finish,
           "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]},
           "timings": {"prefill_tok_s": timings.get("prefill_tok_s", 0.0),
                       "decode_tok_s": timings.get("decode_tok_s", 0.0)}}
    if tool_calls:
        out["tool_calls"] = tool_calls
    print(json.dumps(out, ensure_ascii=False))
