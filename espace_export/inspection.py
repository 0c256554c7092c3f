"""Inspect: what ``compress`` would target, and the compression each ratio reaches — before calibrating.

``polygraphy inspect model`` for ESPACE: the weight GEMMs found (K×N), the sibling groups that would share
one projection, the GEMMs left out and why (output heads, ``--exclude``), and for each ratio the rank L of
every layer and the targeted and total compression the rewrite reaches. Only the graph is read (external
weights stay on disk) and nothing runs, so it takes seconds on any model.

The ranks come from the same calls ``compress`` makes (:func:`espace_export.pipeline.decide_layers`, then
:func:`espace_export.pipeline.share_siblings`), and the savings from the counting rule of the selection
(:func:`espace_export.selection.planner.unit_saving`: a shared projection counted once per group). With ``--select
none`` (every layer at the ratio's rank) these are exactly the layers and ranks ``compress`` writes; with a
selection, the layers it may pick from at ``--layer-ratio``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from espace_export.errors import EspaceError
from espace_export.io.models import load_model
from espace_export.options import RankOptions
from espace_export.pipeline import decide_layers, share_siblings
from espace_export.selection.planner import WEIGHT_FREE, unit_saving
from espace_export.selection.ranks import check_ratio, layer_compression
from graph_passes.find import (
    _HEAD_NAME_HINTS,
    ConstantTable,
    GemmTarget,
    _embedding_tables,
    find_targets,
    group_by_activation,
    parameter_count,
)

DEFAULT_RATIOS = (0.3, 0.5, 0.7)
# One P per layer whatever the siblings do (the weight-aware candidates and the SVD baselines).
_SINGLE_METHODS = ("go-mse", "go-mse-l2", "svd", "asvd", "whitened-svd")


def head_reason(model: onnx.ModelProto, target: GemmTarget) -> str:
    """Why :func:`graph_passes.find.find_targets` calls ``target`` an output head (its three tests, in order)."""
    lowered = target.name.lower() + " " + target.weight.lower()
    hint = next((h for h in _HEAD_NAME_HINTS if h in lowered), None)
    if hint:
        return f"head: name has '{hint}'"
    tables, _ = _embedding_tables(model.graph, ConstantTable(model.graph))
    if target.weight in tables:
        return "head: tied to the token embedding"
    return "head: vocabulary-wide, no GEMM after"


def inspect_model(
    model_path: str | os.PathLike[str],
    ranks: RankOptions | None = None,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    method: str = "mse",
    **rank_settings: Any,
) -> dict[str, Any]:
    """The targets of ``model_path`` and what each of ``ratios`` would make of them; JSON-serialisable.

    The rank settings are a :class:`~espace_export.options.RankOptions` (``ranks``; its ``ratio`` is replaced by
    each of ``ratios``), or its fields as keywords (``rank_rule="16", exclude=[...]``) over ``ranks``.

    Keys: ``model``, ``settings``, ``total_params``, ``targeted_params``, ``targets`` (name, node, K, N,
    params, dtype, activation, group), ``groups`` (siblings reading one activation), ``excluded`` (name, K,
    N, reason), ``ratios`` (per ratio: ``ranks`` by layer, None = dense; layers compressed/dense; targeted
    and total params after and compression).

    ``method`` matters only to the count of stored numbers: siblings that read one activation at one rank
    get a byte-identical P from a weight-free method (``mse``, ``nmse``, ``nl-mse``…), which the rewrite
    stores once even with ``siblings="separate"``. For ``best``/``auto`` under ``separate`` that depends on
    which method wins, so each P is counted (``params_exact`` is then False: an upper bound).

    Raises:
        EspaceError: an unreadable model, one without a compressible GEMM, a bad ratio, rank rule or regex.
    """
    options = (ranks or RankOptions()).with_settings(**rank_settings)  # validated here, once
    for ratio in ratios:
        check_ratio(ratio)  # also with --rank, which RankOptions lets skip the ratio
    if not ratios:
        raise EspaceError("no ratio to inspect", "pass --ratio R (repeatable)")
    model = load_model(model_path, load_weights=False)
    found = find_targets(model, include_heads=True)
    targets = [t for t in found if options.include_heads or t.role == "block"]
    if not targets:
        raise EspaceError(
            f"{model_path} has no compressible GEMM (MatMul/Gemm with a 2-D constant weight)",
            "check that weights are initializers (export with do_constant_folding) or use --include-heads",
        )
    matched = {t.name for t in targets if any(p.search(t.name) for p in options.patterns)}
    excluded = [_left_out(t, head_reason(model, t)) for t in found if t not in targets]
    excluded += [_left_out(t, "--exclude matches") for t in targets if t.name in matched]
    groups = _sibling_groups([t for t in targets if t.name not in matched]) if options.siblings == "shared" else []
    group_of = {name: group["group"] for group in groups for name in group["members"]}
    total_params = parameter_count(model)
    return {
        "model": str(Path(model_path)),
        "settings": {
            "rank_rule": str(options.rank_rule),
            "min_rank": options.min_rank,
            "rank": options.rank,
            "include_heads": options.include_heads,
            "exclude": list(options.exclude),
            "siblings": options.siblings,
        },  # fmt: skip
        "total_params": total_params,
        "targeted_params": sum(t.params for t in targets),
        "targets": [{**{k: getattr(t, k) for k in _TARGET_KEYS}, "group": group_of.get(t.name)} for t in targets],
        "groups": groups,
        "excluded": excluded,
        "ratios": [_at_ratio(targets, dataclasses.replace(options, ratio=r), method, total_params) for r in ratios],
    }


_TARGET_KEYS = ("name", "node", "pattern", "K", "N", "params", "dtype", "activation")


def _left_out(target: GemmTarget, reason: str) -> dict[str, Any]:
    return {"name": target.name, "K": target.K, "N": target.N, "reason": reason}


def _sibling_groups(targets: Sequence[GemmTarget]) -> list[dict[str, Any]]:
    """The groups of targets that read one activation (two or more), labelled g1, g2, ..."""
    groups: list[dict[str, Any]] = []
    for activation, members in group_by_activation(list(targets)).items():
        if len(members) > 1:
            groups.append(
                {"group": f"g{len(groups) + 1}", "activation": activation, "members": [t.name for t in members],
                 "K": members[0].K, "N": sum(t.N for t in members)}
            )  # fmt: skip
    return groups


def _at_ratio(targets: Sequence[GemmTarget], options: RankOptions, method: str, total_params: int) -> dict[str, Any]:
    """Ranks, compressed layers and the parameters saved at ``options.ratio`` (as ``compress`` decides them)."""
    by_name = {t.name: t for t in targets}
    decisions = decide_layers(list(targets), options, "")
    shared = share_siblings(decisions, options)
    ranks = {d.target.name: d.L for d in decisions}
    in_groups = {name for members in shared for name in members}
    units = [[by_name[n] for n in members] for members in shared]
    alone: dict[tuple[str, Any], list[GemmTarget]] = {}  # one stored P for each key
    for d in decisions:
        if d.L is not None and d.target.name not in in_groups:
            key = (d.target.activation, d.L) if method in WEIGHT_FREE else (d.target.name, None)
            alone.setdefault(key, []).append(d.target)
    units += list(alone.values())
    saved = 0
    for members in units:
        L = ranks[members[0].name]
        assert L is not None  # every unit is compressed
        saved += unit_saving(members, L)
    compressed = sum(L is not None for L in ranks.values())
    targeted_params = sum(t.params for t in targets)
    return {
        "ratio": options.ratio,
        "ranks": ranks,
        "layer_compression": {
            n: layer_compression(by_name[n].K, by_name[n].N, L) for n, L in ranks.items() if L is not None
        },
        "shared_groups": len(shared),
        "layers_compressed": compressed,
        "layers_dense": len(ranks) - compressed,
        "targeted_params_after": targeted_params - saved,
        "targeted_compression": saved / targeted_params,
        "total_params_after": total_params - saved,
        "total_compression": saved / total_params if total_params else 0.0,
    }


def print_inspection(result: dict[str, Any], console: Any = None) -> None:
    """The inspection as rich tables (targets with their rank per ratio; what each ratio reaches; what is
    left out), fitting the console's width like the compression report."""
    from rich.console import Console
    from rich.table import Table

    from espace_export.io.reports import layer_table

    console = console or Console()
    ratios = result["ratios"]
    columns = [("K×N", "right"), ("group", "left")] + [(f"L@{r['ratio']:g}", "right") for r in ratios]
    rows = [
        [f"{t['K']}×{t['N']}", t["group"] or "-"]
        + [str(r["ranks"][t["name"]]) if r["ranks"][t["name"]] is not None else "dense" for r in ratios]
        for t in result["targets"]
    ]
    names = [t["name"] for t in result["targets"]]
    console.print(layer_table(f"ESPACE targets in {Path(result['model']).name}", names, columns, rows,
                              width=console.width))  # fmt: skip

    settings = result["settings"]
    summary = Table(
        title="Compression per ratio",
        caption=f"rank rule {settings['rank_rule']}, min rank {settings['min_rank']}, siblings {settings['siblings']}",
        header_style="bold",
    )
    for header in ("ratio", "layers", "groups", "targeted params", "targeted", "total"):
        summary.add_column(header, justify="right")
    for r in ratios:
        summary.add_row(
            f"{r['ratio']:g}",
            f"{r['layers_compressed']}/{r['layers_compressed'] + r['layers_dense']}",
            str(r["shared_groups"]),
            f"{result['targeted_params']:,} → {r['targeted_params_after']:,}",
            f"{r['targeted_compression']:.3f}",
            f"{r['total_compression']:.3f}",
        )
    console.print(summary)
    if result["excluded"]:
        left_out = layer_table(
            "Left dense", [e["name"] for e in result["excluded"]], [("K×N", "right"), ("why", "left")],
            [[f"{e['K']}×{e['N']}", e["reason"]] for e in result["excluded"]], width=console.width,
        )  # fmt: skip
        if any(e["reason"].startswith("head") for e in result["excluded"]):
            left_out.caption = "\n".join(filter(None, [left_out.caption, "heads: compress them with --include-heads"]))
        console.print(left_out)
