"""Selection: how much to compress each layer (the rank L) to meet a target ratio."""

from __future__ import annotations

import math

from espace_export.errors import EspaceError

RankRule = str  # "pow2", or the decimal string of a granularity such as "16" or "64"


def parse_rank_rule(rule: str | int) -> int | None:
    """``"pow2"`` → None (powers of two); an integer (or its string) → that granularity."""
    if isinstance(rule, int) or (isinstance(rule, str) and rule.isdigit()):
        granularity = int(rule)
        if granularity < 1:
            raise EspaceError(f"rank granularity must be at least 1, got {granularity}", "use pow2, 16 or 64")
        return granularity
    if rule == "pow2":
        return None
    raise EspaceError(f"unknown rank rule {rule!r}", "use pow2 (tensor-core friendly) or a multiple such as 16 or 64")


def layer_compression(K: int, N: int, L: int) -> float:
    """``1 − L(K+N)/(KN)``: the fraction of the layer's KN weights saved by the pair P, PᵀW."""
    return 1.0 - L * (K + N) / (K * N)


def choose_rank(K: int, N: int, ratio: float, *, rule: str | int = "pow2", min_rank: int = 16) -> int | None:
    """The largest L allowed by ``rule`` with ``L(K+N) ≤ (1−ratio)·K·N``; None when that is below ``min_rank``.

    With ``pow2`` every compressed layer saves at least ``ratio`` (the paper's rule); on narrow layers
    that can overshoot (K=N=384 at 0.2 lands at 0.5), which a granularity such as 16 avoids.
    """
    check_ratio(ratio)
    budget = (1.0 - ratio) * K * N / (K + N)
    granularity = parse_rank_rule(rule)
    if budget < 1:
        return None
    if granularity is None:
        L = 2 ** int(math.floor(math.log2(budget)))
    else:
        L = int(budget // granularity) * granularity
    return L if max(min_rank, 1) <= L else None


def check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise EspaceError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}", "try --ratio 0.5")
