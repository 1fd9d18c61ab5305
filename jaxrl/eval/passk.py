"""pass@k estimators. The two differ for k > 1; report which one a number comes from."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product.

    n samples, c of them correct. Needs n >= k: fewer samples cannot estimate pass@k without bias.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got correct={c}, samples={n}")
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples (samples={n}); draw more samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def cvdp_pass_at_k(n: int, c: int, k: int) -> float:
    """CVDP's estimator 1 - (1 - c/n)^k: sampling with replacement, biased for k > 1."""
    if not 0 <= c <= n or n == 0:
        raise ValueError(f"need 0 <= correct <= samples and samples > 0, got {c=}, {n=}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(1.0 - (1.0 - c / n) ** k)


def mean_pass_at_k(counts: list[tuple[int, int]], k: int, estimator=pass_at_k) -> float:
    """Average over tasks of estimator(n, c, k) for (n, c) per task."""
    if not counts:
        raise ValueError("no tasks to average over")
    return float(np.mean([estimator(n, c, k) for n, c in counts]))
