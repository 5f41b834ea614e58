"""Exponential backoff with jitter, shared by everything that retries (pure)."""

from __future__ import annotations


def backoff_delay(failures: int, fraction: float, base: float = 1.0, cap: float = 30.0) -> float:
    """Delay before retry number ``failures`` (>= 1); ``fraction`` uniform in [0, 1) gives the
    jitter: the delay lies in the upper half of ``min(cap, base * 2**(failures-1))``."""
    ceiling = min(cap, base * 2.0 ** max(0, failures - 1))
    return ceiling / 2 + fraction * ceiling / 2
