"""Selection: how much to compress each layer (the rank L) to meet a target ratio."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from espace_export.errors import EspaceError

RankRule = str  # "pow2", or the decimal string of a granularity such as "16" or "64"
# A granularity above any GEMM width this tool meets (a larger one only ever leaves every layer dense).
MAX_GRANULARITY = 1 << 20


def parse_rank_rule(rule: str | int) -> int | None:
    """``"pow2"`` → None (powers of two); an integer (or its ASCII decimal string) → that granularity.

    Raises:
        EspaceError: anything else (``"²"``, ``"١٦"``, ``"16.0"``, a bool, a granularity below 1 or above
            :data:`MAX_GRANULARITY`), in one line.
    """
    fix = "use pow2 (tensor-core friendly) or a multiple such as 16 or 64"
    if isinstance(rule, str) and rule.strip() == "pow2":
        return None
    if isinstance(rule, int) and not isinstance(rule, bool):
        granularity = rule
    elif isinstance(rule, str) and re.fullmatch(r"[0-9]{1,9}", rule.strip()):
        granularity = int(rule.strip())
    else:
        shown = rule if not isinstance(rule, str) or len(rule) <= 40 else rule[:40] + "…"
        raise EspaceError(f"unknown rank rule {shown!r}", fix)
    if not 1 <= granularity <= MAX_GRANULARITY:
        raise EspaceError(f"rank granularity must lie between 1 and {MAX_GRANULARITY}, got {granularity}", fix)
    return granularity


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


def layer_rank(
    K: int, N: int, ratio: float, *, rule: str | int = "pow2", min_rank: int = 16, rank: int | None = None
) -> int | None:
    """A forced ``rank`` (clipped to K), or else the ratio rule of :func:`choose_rank`."""
    return min(rank, K) if rank is not None else choose_rank(K, N, ratio, rule=rule, min_rank=min_rank)


SIBLING_MODES = ("separate", "shared")


def check_siblings(mode: str) -> None:
    if mode not in SIBLING_MODES:
        raise EspaceError(f"unknown sibling mode {mode!r}", "use separate or shared")


def check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise EspaceError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}", "try --ratio 0.5")


# ---- per-layer selection (paper §4.2, appendix C) ------------------------------------------------------


def relative_increase(loss: float, baseline: float) -> float:
    """``(loss − baseline)/baseline``; a loss whose baseline is 0 (distillation) is its own increase."""
    return (loss - baseline) / baseline if baseline > 0 else loss


def best_method(scores: dict[str, float]) -> str:
    """The method with the lowest score (ties: the first listed)."""
    return min(scores, key=lambda m: (scores[m], list(scores).index(m)))


def rank_layers(harm: dict[str, float], max_layer_loss: float | None = None) -> tuple[list[str], list[str]]:
    """Layers from least to most harmful, and those skipped because their alone-harm exceeds the limit."""
    order = sorted(harm, key=lambda name: (harm[name], name))
    if max_layer_loss is None:
        return order, []
    return [n for n in order if harm[n] <= max_layer_loss], [n for n in order if harm[n] > max_layer_loss]


def progressive_selection(
    order: Sequence[str],
    saved: dict[str, int],
    targeted_params: int,
    ratio: float,
    *,
    evaluate: Callable[[list[str]], float] | None = None,
    estimate: dict[str, float] | None = None,
    baseline: float = 0.0,
    full_curve: bool = True,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Apply layers in ``order`` one by one until ``ratio`` of the targeted parameters is saved.

    ``saved[name]`` is the parameter count a layer saves. Each step of the curve records the layers applied,
    the achieved targeted compression and the loss: measured by ``evaluate(applied_layers)`` when given,
    else ``baseline`` plus the sum of the per-layer ``estimate`` (a proxy). With ``full_curve`` the curve goes
    on past the ratio to every layer (for the plot and the inflection point); the selection stops at it.
    """
    curve: list[dict[str, Any]] = [{"layers": 0, "layer": None, "compression": 0.0, "loss": baseline}]
    applied: list[str] = []
    selected: list[str] | None = None
    total_saved = 0
    running = baseline
    for name in order:
        if selected is not None and not full_curve:
            break
        applied.append(name)
        total_saved += saved[name]
        if evaluate is not None:
            running = evaluate(list(applied))
        else:
            running += (estimate or {}).get(name, 0.0)
        compression = total_saved / targeted_params
        curve.append({"layers": len(applied), "layer": name, "compression": compression, "loss": running})
        if selected is None and compression >= ratio - 1e-12:
            selected = list(applied)
    return (selected if selected is not None else list(applied)), curve


def inflection_point(curve: Sequence[dict[str, Any]]) -> int:
    """Index of the curve's knee: the point farthest below the chord from first to last (Kneedle).

    Loss vs compression bends upward once the harmful layers start to be applied; before the knee each
    layer buys compression cheaply, after it each costs more than the average.
    """
    if len(curve) < 3:
        return len(curve) - 1
    x = np.array([p["compression"] for p in curve], dtype=np.float64)
    y = np.array([p["loss"] for p in curve], dtype=np.float64)
    span_x, span_y = x[-1] - x[0], y.max() - y.min()
    if span_x <= 0 or span_y <= 0:
        return len(curve) - 1
    gap = (x - x[0]) / span_x - (y - y.min()) / span_y
    return int(np.argmax(gap))
