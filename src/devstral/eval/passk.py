"""pass@k, the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples drawn
without replacement from the n include at least one that passes. Computed as a product so that n in
the hundreds does not overflow floats: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
"""

from __future__ import annotations

from collections.abc import Iterable

from devstral.errors import DevstralError


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k, each problem given as (n samples, c correct)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    return sum(values) / len(values) if values else 0.0


def parse_ks(text: str | None, samples: int) -> list[int]:
    """--k "1,10,100" -> the ks that the number of samples allows (1 always)."""
    if text is None:
        return [k for k in (1, 10, 100) if k <= samples]
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise DevstralError(f"--k must be a comma-separated list of integers, got {text!r}") from None
    bad = [k for k in ks if k < 1 or k > samples]
    if not ks or bad:
        raise DevstralError(f"--k values must be between 1 and --samples ({samples}), got {text!r}")
    return ks
