"""Offline SASS statistics of a Triton kernel: compile it for a GPU target on a machine without one
(Triton's wheel ships ptxas and nvdisasm) and count the instructions of its longest loop.

A decode GEMV is bandwidth-bound only while it spends few instructions per weight; this is how that
is checked in CI without a GPU (tests/test_kernels_gguf_wide.py) and how the kernels were tuned.
Integer arguments that the launcher would specialize as divisible by 16 are passed in `div16`.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);")


@dataclass
class LoopStats:
    instructions: int  # in the longest loop body
    ops: collections.Counter  # opcode (without modifiers) -> count in that loop
    registers_spilled: bool  # local-memory loads or stores anywhere in the kernel


def tools_available(tools: tuple[str, ...] = ("ptxas", "nvdisasm")) -> bool:
    """Whether Triton's wheel ships these binaries here (registers() also needs "cuobjdump")."""
    try:
        import triton
    except ImportError:
        return False
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.access(os.path.join(bindir, t), os.X_OK) for t in tools)


def offline_json(script: str, *args: str, timeout: float = 600) -> dict:
    """Run `script` (a test file whose __main__ compiles kernels offline and prints one JSON line) in a
    fresh process with Triton in compiled mode -- no interpreter state from the calling tests -- and
    return that JSON. A failure raises with the end of the script's stderr."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_kernel(fn, signature: dict, constexprs: dict, *, div16=(), num_warps: int = 4, num_stages: int = 1,
                   arch: int = 90, **options):
    """`fn` compiled for sm_<arch> (Triton's CompiledKernel: its asm holds "ptx" and "cubin"); options are Triton's
    other compile options (launch_pdl=True: compiled as a programmatic dependent launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature)
    names = list(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16 if n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **options})


def compile_sass(fn, signature: dict, constexprs: dict, *, div16=(), num_warps: int = 4, num_stages: int = 1,
                 arch: int = 90) -> str:
    """SASS text of `fn` compiled for sm_<arch>."""
    kernel = compile_kernel(fn, signature, constexprs, div16=div16, num_warps=num_warps, num_stages=num_stages,
                            arch=arch)
    return disassemble(kernel.asm["cubin"])


def disassemble(cubin: bytes) -> str:
    """SASS text of a compiled kernel's cubin (Triton's own nvdisasm)."""
    return _run_tool("nvdisasm", cubin, "-c")


def registers(cubin: bytes) -> int:
    """Registers a thread of a compiled kernel (Triton's own cuobjdump)."""
    return int(re.search(r"REG:(\d+)", _run_tool("cuobjdump", cubin, "--dump-resource-usage")).group(1))


def _run_tool(name: str, cubin: bytes, *args: str) -> str:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(bindir, name), *args, path], capture_output=True, text=True,
                              check=True).stdout


def _loops(lines: list[str]) -> list[list[str]]:
    """The instruction lines of every backward-branch loop (a label and a later branch to it)."""
    labels, loops = {}, []
    for i, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append([x for x in lines[labels[m.group(1)]:i + 1] if _INSTR.search(x)])
    return loops


def _opcode(line: str) -> str:
    toks = _INSTR.search(line).group(1).split()
    return (toks[1] if toks[0].startswith("@") else toks[0]).split(".")[0]


def loop_stats(sass: str) -> LoopStats:
    """The longest backward-branch loop of the SASS listing. Where a kernel's main loop sits inside another (a
    stream-K loop over row tiles) or an epilogue has a loop around it, this is the outer one: innermost_loop_stats."""
    lines = sass.splitlines()
    body = max(_loops(lines), key=len, default=[])
    return _stats(lines, body)


def innermost_loop_stats(sass: str, opcode: str) -> LoopStats:
    """The shortest backward-branch loop that holds `opcode` (IDP: a GEMV's dp4a loop)."""
    lines = sass.splitlines()
    body = min((b for b in _loops(lines) if any(_opcode(x) == opcode for x in b)), key=len, default=[])
    return _stats(lines, body)


def _stats(lines: list[str], body: list[str]) -> LoopStats:
    ops = collections.Counter()
    for line in body:
        ops[_opcode(line)] += 1
    spilled = any(re.search(r"\b(LDL|STL)\b", line) for line in lines)
    return LoopStats(len(body), ops, spilled)
