"""Erase a secret from this process's /proc/self/cmdline and /proc/self/environ (Linux).

Any process of the same user can read those two files (`cat /proc/$PPID/cmdline` from a command run
without the sandbox), and `--api-key` or DEVSTRAL_API_KEY would be in them. Both files are read from
this process's own memory (the argv and environment strings the kernel placed on the stack), and
Python keeps its own copies after start-up, so overwriting the originals changes nothing else.
"""

from __future__ import annotations

import sys

# Field numbers in /proc/[pid]/stat (proc(5)): where argv and the environment strings lie.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51


def scrub_secret(secret: str) -> bool:
    """Overwrite every copy of `secret` in the argv and environment strings with '*'. Returns whether
    the kernel's view could be rewritten (False off Linux or where /proc/self/mem is not writable)."""
    if not secret or not sys.platform.startswith("linux"):
        return False
    needle = secret.encode("utf-8", errors="surrogateescape")
    try:
        with open("/proc/self/stat", "rb") as f:
            # Fields after the command name, which is in parentheses and may hold anything.
            fields = f.read().rsplit(b")", 1)[1].split()
        regions = [(int(fields[a - 3]), int(fields[b - 3])) for a, b in ((_ARG_START, _ARG_END), (_ENV_START, _ENV_END))]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            for start, end in regions:
                if not 0 < start < end:
                    continue
                mem.seek(start)
                data = mem.read(end - start)
                if needle in data:
                    mem.seek(start)
                    mem.write(data.replace(needle, b"*" * len(needle)))
    except (OSError, ValueError, IndexError):
        return False
    return True
