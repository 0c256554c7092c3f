"""Balance the ranges of ESPACE's projected pairs before quantizing them.

Matches every projected pair written by :func:`graph_passes.project.project` — one ``T = MatMul(X, P)``
node and the expand GEMMs ``Y = MatMul/Gemm(T, B)`` that read it (siblings share T) — and rewrites their
constants with an invertible L×L matrix ``Q`` inside the L-space:

    P  →  P·Q          B  →  Q⁻¹·B          so that   (X·P·Q)·(Q⁻¹·B) = (X·P)·B.

Two choices of Q, which compose:

- :func:`rescale_pairs` — diagonal ``Q = D⁻¹``, SmoothQuant-style (Xiao et al. 2023): column j of the
  projected activation ``X·P`` is divided by ``d_j`` and row j of ``B`` multiplied by it, with
  ``d_j = max|(XP)_j|^α / max|B_j|^(1−α)`` (:func:`smoothing_scales`). ESPACE concentrates the activation's
  energy in its first components, which a per-tensor activation scale resolves badly; α moves that range
  into B's rows, where per-output-channel weight scales do not see it.
- :func:`rotate_pairs` — orthogonal ``Q = H`` (a normalised Hadamard matrix when L is a power of two,
  otherwise a seeded random rotation): spreads every component's energy over all L columns, so no column
  dominates the per-tensor range; P stays orthonormal when it was (``(PH)ᵀ(PH) = I``).

Guarantees: the graph computes the same function (up to float round-off of the rewritten constants); only
the initializers of P and B change (a constant also read by another node is copied, not changed); node
names, tags and every other tensor stay. Pure ONNX: the activation ranges come from the caller
(:func:`espace_export.quantize.projected_activation_ranges` measures them with ONNX Runtime).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg
from onnx import numpy_helper

from graph_passes.find import ConstantTable, _attr, find_projected_pairs


@dataclass(frozen=True)
class PairGroup:
    """One projection ``T = X·P`` and the expand GEMMs reading T (one, or one per sibling)."""

    project_node: str
    projected: str  # the tensor T = X·P
    projection: str  # initializer P (K×L)
    folded: tuple[tuple[str, bool], ...]  # (initializer B, stored transposed as N×L) per expand node
    layers: tuple[str, ...]
    L: int


def pair_groups(model: onnx.ModelProto) -> list[PairGroup]:
    """The projected pairs of ``model``, grouped by their shared ``X·P`` node, in graph order."""
    nodes = {node.name: node for node in model.graph.node}
    groups: dict[str, list[tuple[str, str, bool]]] = {}
    for pair in find_projected_pairs(model):
        expand = nodes[pair.expand_node]
        transposed = expand.op_type == "Gemm" and bool(_attr(expand, "transB", 0))
        groups.setdefault(pair.project_node, []).append((pair.name, expand.input[1], transposed))
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    found = []
    for name in sorted(groups, key=order.__getitem__):
        project = nodes[name]
        members = groups[name]
        folded = tuple(dict.fromkeys((b, t) for _, b, t in members))
        L = ConstantTable(model.graph).dims(project.input[1])[1]
        found.append(PairGroup(name, project.output[0], project.input[1], folded, tuple(m[0] for m in members), L))
    return found


def folded_row_max(model: onnx.ModelProto, group: PairGroup) -> np.ndarray:
    """``max_n |B_jn|`` over every expand GEMM of ``group``: the range of each row j of the folded weights."""
    constants = ConstantTable(model.graph)
    rows = [np.abs(_rows_first(constants.array(b), t)).max(axis=1) for b, t in group.folded]
    return np.max(rows, axis=0).astype(np.float64)


def smoothing_scales(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``d_j = a_j^α / w_j^(1−α)``; components that never fire (a_j = 0) keep d_j = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    a = np.asarray(activation_max, dtype=np.float64)
    w = np.maximum(np.asarray(weight_max, dtype=np.float64), 1e-12)
    scales = np.where(a > 0, np.power(np.maximum(a, 1e-30), alpha) / np.power(w, 1.0 - alpha), 1.0)
    return np.where(np.isfinite(scales) & (scales > 0), scales, 1.0)


def hadamard_rotation(L: int, seed: int = 0) -> np.ndarray:
    """An orthogonal L×L matrix that spreads every axis over all: Hadamard/√L when L is a power of two, else
    a random rotation (QR of a seeded Gaussian, signs fixed so it is uniformly distributed)."""
    if L & (L - 1) == 0:
        return scipy.linalg.hadamard(L).astype(np.float64) / np.sqrt(L)
    Q, R = np.linalg.qr(np.random.default_rng(seed).standard_normal((L, L)))
    return Q * np.sign(np.diag(R))


def rescale_pairs(model: onnx.ModelProto, scales: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``P → P·D⁻¹``, ``B → D·B`` for each group's project node named in ``scales`` (d: L positive values).
    In place; returns ``model``."""
    transforms = {}
    for name, d in scales.items():
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 1 or not np.all(np.isfinite(d)) or not np.all(d > 0):
            raise ValueError(f"scales for {name} must be positive and finite")
        transforms[name] = (np.diag(1.0 / d), np.diag(d))
    return _transform(model, transforms)


def rotate_pairs(model: onnx.ModelProto, rotations: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """``P → P·H``, ``B → Hᵀ·B`` with H orthogonal, per project node (default: :func:`hadamard_rotation` for
    every group). In place; returns ``model``."""
    if rotations is None:
        rotations = {g.project_node: hadamard_rotation(g.L, seed=i) for i, g in enumerate(pair_groups(model))}
    transforms = {}
    for name, H in rotations.items():
        H = np.asarray(H, dtype=np.float64)
        if H.ndim != 2 or H.shape[0] != H.shape[1] or not np.allclose(H.T @ H, np.eye(len(H)), atol=1e-8):
            raise ValueError(f"rotation for {name} is not an orthogonal matrix")
        transforms[name] = (H, H.T)
    return _transform(model, transforms)


def _rows_first(B: np.ndarray, transposed: bool) -> np.ndarray:
    return B.T if transposed else B


def _transform(model: onnx.ModelProto, transforms: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """``P → P·Q``, ``B → Q⁻¹·B`` for each (Q, Q⁻¹) by project node name."""
    groups = {g.project_node: g for g in pair_groups(model)}
    unknown = set(transforms) - set(groups)
    if unknown:
        raise ValueError(f"no projected pair with project node {sorted(unknown)[0]!r}")
    constants = ConstantTable(model.graph)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes = {node.name: node for node in model.graph.node}
    for name, (Q, Q_inv) in transforms.items():
        group = groups[name]
        if Q.shape != (group.L, group.L):
            raise ValueError(f"{name}: a {Q.shape} transform for rank {group.L}")
        P = constants.array(group.projection)
        _store(model, nodes[name], 1, (P.astype(np.float64) @ Q).astype(P.dtype), readers)
        for expand in model.graph.node:
            if len(expand.input) < 2 or expand.input[0] != group.projected:
                continue
            B = constants.array(expand.input[1])
            transposed = expand.op_type == "Gemm" and bool(_attr(expand, "transB", 0))
            rows = Q_inv @ _rows_first(B.astype(np.float64), transposed)
            _store(model, expand, 1, _rows_first(rows, transposed).astype(B.dtype), readers)
    return model


def _store(
    model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray, readers: dict[str, int]
) -> None:
    """Put ``value`` in ``node.input[index]``: in place when only this node reads it, else as a new initializer."""
    name = node.input[index]
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    initializers = model.graph.initializer
    position = next((i for i, t in enumerate(initializers) if t.name == name), None)
    if position is not None and readers.get(name, 0) == 1:
        initializers[position].CopyFrom(tensor)
        return
    taken = {t.name for t in initializers}
    fresh, suffix = f"{name}.equalized", 1
    while fresh in taken:
        suffix += 1
        fresh = f"{name}.equalized_{suffix}"
    tensor.name = fresh
    initializers.append(tensor)
    readers[name] = readers.get(name, 1) - 1
    readers[fresh] = 1
    node.input[index] = fresh


__all__ = [
    "PairGroup",
    "folded_row_max",
    "hadamard_rotation",
    "pair_groups",
    "rescale_pairs",
    "rotate_pairs",
    "smoothing_scales",
]
