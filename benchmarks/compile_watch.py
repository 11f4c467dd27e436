"""Triton compilations during a measured run. A compile costs 0.3-3 s on the host, so one inside a timed
run of a few seconds decides its figure: benchmarks record what compiled while they timed, and a warm-up
that misses a specialization shows up here by kernel name and the argument attributes Triton keyed it on
(an integer argument equal to 1 or divisible by 16 is a separate compilation).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def compiles():
    """Yields a list that fills with one line per Triton kernel compiled inside the block."""
    seen: list[str] = []
    try:
        from triton import knobs
    except ImportError:  # no Triton (CPU runs): nothing can compile
        yield seen
        return
    before = knobs.runtime.jit_post_compile_hook

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 -- Triton's names
        seen.append(f"{fn.name} {compile['configs'][0]}")
        if before is not None:
            return before(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                          already_compiled=already_compiled)
        return None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_post_compile_hook = before
