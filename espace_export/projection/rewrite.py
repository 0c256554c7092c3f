"""Rewrite a model by a plan's factorizations: the graph pass plus the bookkeeping around it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from espace_export.selection.factorizations import Factorization
from graph_passes.find import find_projected_pairs


def apply_factorizations(model: onnx.ModelProto, chosen: Sequence[tuple[object, Factorization]]) -> onnx.ModelProto:
    """Rewrite each ``(target, factorization)`` into the pair ``(X·A)·B`` (in place; returns ``model``).

    :func:`graph_passes.project` with A as the projection and B as the folded factor (B = AᵀW for ESPACE,
    the SVD's second factor for the baselines; a missing B is folded as AᵀW, or as M·W when the
    factorisation has M (oblique), from the model's weight). Sibling sharing of ``X·A`` applies as in ``project``.
    """
    from graph_passes import Projection, project
    from graph_passes.find import weight_matrix

    def folded(target: object, f: Factorization) -> np.ndarray | None:
        if f.B is not None or f.M is None:  # B = AᵀW is folded by the graph pass itself
            return f.B
        return f.folded(weight_matrix(model, target).astype(np.float64)).B  # type: ignore[arg-type]

    return project(model, [Projection(target, f.A, folded=folded(target, f)) for target, f in chosen])  # type: ignore[arg-type]


def projected_params(model: onnx.ModelProto) -> int:
    """Numbers stored by the projected pairs: each distinct P (K·L, shared by siblings) and each PᵀW (L·N)."""
    pairs = find_projected_pairs(model)
    projections = {pair.project_node: pair.K * pair.L for pair in pairs}
    return sum(projections.values()) + sum(pair.L * pair.N for pair in pairs)
