"""Two compression reports' per-layer selections side by side, and how many layers differ.

Meant for checks such as "the default ``--stats-precision float32`` selects what ``float64`` selects": run
``espace-export compress`` twice with one setting changed, then

    python benchmarks/selections.py A.report.json B.report.json            # every layer
    python benchmarks/selections.py A.report.json B.report.json --differing  # only the layers that differ

A layer differs when it is compressed in one report and not the other, or compressed with another method or
rank. For a differing layer the two leading validated scores (``scores`` in the report: method → validation
loss) of each report are printed, so one sees whether the choice was a near tie. Also printed: at how many
layers the progressive order differs, the largest relative change of any method's validated score, and the
closest call (the smallest relative margin of a runner-up over the winner).
Exit status 0 either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def selections(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Layer name → its report entry."""
    return {layer["name"]: layer for layer in report["layers"]}


def choice(layer: dict[str, Any] | None) -> str:
    """``method@L`` for a compressed layer, ``dense`` otherwise."""
    if layer is None or not layer.get("compressed"):
        return "dense"
    return f"{layer.get('candidate')}@{layer.get('L')}"


def leading_scores(layer: dict[str, Any] | None, count: int = 2) -> str:
    """The ``count`` lowest validated scores, as ``method score``."""
    scores = {m: s for m, s in ((layer or {}).get("scores") or {}).items() if s is not None}
    ranked = sorted(scores.items(), key=lambda item: item[1])[:count]
    return ", ".join(f"{method} {score:.6g}" for method, score in ranked) or "-"


def score_change(first: dict[str, Any] | None, second: dict[str, Any] | None) -> float:
    """The largest relative difference of one method's validated score between the two layer entries."""
    a, b = (first or {}).get("scores") or {}, (second or {}).get("scores") or {}
    changes = [
        abs(a[m] - b[m]) / max(abs(a[m]), abs(b[m]), 1e-300)
        for m in a.keys() & b.keys()
        if a[m] is not None and b[m] is not None
    ]
    return max(changes, default=0.0)


def winning_margin(layer: dict[str, Any] | None) -> float:
    """How far the runner-up's validated score is above the winner's, relative (inf with fewer than two)."""
    scores = sorted(s for s in ((layer or {}).get("scores") or {}).values() if s is not None)
    return (scores[1] - scores[0]) / max(abs(scores[0]), 1e-300) if len(scores) > 1 else float("inf")


def compare(first: dict[str, Any], second: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(layer, choice in ``first``, choice in ``second``, whether they differ) in ``first``'s layer order."""
    a, b = selections(first), selections(second)
    names = list(a) + [n for n in b if n not in a]
    return [(n, choice(a.get(n)), choice(b.get(n)), choice(a.get(n)) != choice(b.get(n))) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--differing", action="store_true", help="print only the layers that differ")
    args = parser.parse_args(argv)
    first, second = (json.loads(p.read_text(encoding="utf-8")) for p in (args.first, args.second))
    rows = compare(first, second)
    width = max(len(name) for name, *_ in rows)
    print(f"{'layer':<{width}}  {args.first.name:<24}  {args.second.name:<24}")
    for name, one, two, differs in rows:
        if differs or not args.differing:
            print(f"{name:<{width}}  {one:<24}  {two:<24}{'  *' if differs else ''}")
            if differs:
                for label, report in ((args.first.name, first), (args.second.name, second)):
                    print(f"{'':<{width}}    {label}: {leading_scores(selections(report).get(name))}")
    differing = sum(differs for *_, differs in rows)
    a, b = selections(first), selections(second)
    reordered = sum(a.get(n, {}).get("order") != b.get(n, {}).get("order") for n, *_ in rows)
    change = max((score_change(a.get(n), b.get(n)), n) for n, *_ in rows)
    print(f"progressive order differs at {reordered} layers; largest relative change of a validated score "
          f"{change[0]:.2e} ({change[1]})")  # fmt: skip
    closest = min((winning_margin(a.get(n)), n) for n, *_ in rows)
    print(f"closest call in {args.first.name}: runner-up {closest[0]:.2e} above the winner ({closest[1]})")
    for label, report in ((args.first.name, first), (args.second.name, second)):
        print(f"{label}: targeted compression {report['targeted_compression']:.4f}, "
              f"{report['layers_compressed']} layers compressed")  # fmt: skip
    print(f"{differing} of {len(rows)} layers differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
