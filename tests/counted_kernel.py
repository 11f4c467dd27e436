"""A Triton kernel stand-in for tests that count launches: `kernel[grid](...)` counts, then launches it."""

from __future__ import annotations


class CountedKernel:
    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]
