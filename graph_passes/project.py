"""Rewrite weight GEMMs into ESPACE projected pairs.

Matches the targets found by :func:`graph_passes.find.find_targets` and rewrites each

    Y = X·W          →   T = MatMul(X, P);   Y = MatMul(T, PᵀW)        (MatMul, MatMul∘Transpose)
    Y = Gemm(X, B, C) →   T = MatMul(X, P);   Y = Gemm(T, B', C)         (B' = PᵀW, or its transpose
                                                                         when transB = 1)

with ``P`` (K×L) and the folded ``PᵀW`` (L×N) stored as new initializers in the weight's dtype.

Guarantees:
- The pair is never folded back into one K×N matrix.
- The original GEMM node keeps its name and its output tensor, so graph inputs, outputs, names,
  dtypes and dynamic axes are unchanged; node metadata (the exporter's module scopes) is kept.
- Siblings that read the same activation with byte-identical P share one ``X·P`` node.
- Weights no longer read by any node (also in subgraphs) are removed; a weight still read elsewhere
  (a tied embedding ``Gather``) stays.
- Every node this pass writes carries ``espace.layer``/``espace.role`` metadata, which
  :func:`graph_passes.find.find_projected_pairs` reads back.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph_passes.find import (
    ESPACE_LAYER_KEY,
    ESPACE_ROLE_KEY,
    GemmTarget,
    nodes_by_path,
    sanitize,
    scopes,
    weight_matrix,
)


@dataclass(frozen=True)
class Projection:
    """Project ``target``'s input onto the columns of ``P`` (K×L, orthonormal for ESPACE).

    ``folded`` is the second factor (L×N) when the caller has it already — an ESPACE plan's PᵀW, or the B
    of a weight factorisation W ≈ P·B whose P is not orthonormal; by default it is folded as PᵀW.
    """

    target: GemmTarget
    P: np.ndarray
    folded: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.P.shape[1])


def fold_weight(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``PᵀW`` (L×N) in float64: the weight of the second GEMM of a projected pair."""
    return P.astype(np.float64).T @ W.astype(np.float64)


NewInitializer = Callable[[np.ndarray, str], onnx.TensorProto]


def project(
    model: onnx.ModelProto,
    projections: Sequence[Projection],
    *,
    keep_weight_inputs: bool = True,
    new_initializer: NewInitializer = numpy_helper.from_array,
) -> onnx.ModelProto:
    """Rewrite ``model`` in place (and return it) so each projection's target becomes a projected pair.

    A target with copies in subgraph bodies (``target.also``) is rewritten in every copy with the same P
    and the same PᵀW, both stored once in the main graph (visible from every body); each copy gets its own
    ``X·P`` node inside its body.

    Models exported with their weights listed as graph inputs (IR < 4 requires it; ``torch.onnx.export``
    with ``keep_initializers_as_inputs``) keep those inputs and their default values: the graph's signature
    does not change, though a replaced weight is then still stored, unread (``keep_weight_inputs=False``
    drops it, and with it the input). An IR-3 model is lifted to IR 4, which lets the new factors be plain
    initializers instead of new graph inputs; IR 4 changes nothing else.

    ``new_initializer(array, name)`` makes the TensorProto of each new factor (default: its values in the
    proto). A caller that streams factors to an external data file passes one returning the tensor already
    external: bytes put into the model proto stay in its protobuf arena until the whole model is freed, even
    after the field is cleared, so a model rewritten group by group would otherwise grow by every factor.
    """
    graph = model.graph
    if model.ir_version and model.ir_version < 4:
        model.ir_version = 4
    located = nodes_by_path(model)
    position = {path: i for i, path in enumerate(located)}
    taken = {t.name for t in graph.initializer}
    for scope in scopes(model):
        taken |= {t.name for t in scope.graph.initializer} | {o for n in scope.graph.node for o in n.output}
    inserts: dict[int, dict[str, list[onnx.NodeProto]]] = {}  # id(graph) → node name → nodes before it
    shared: dict[tuple[int, str, str], onnx.NodeProto] = {}
    stored_p: dict[str, str] = {}  # hash of P → its initializer

    def fresh(name: str) -> str:
        unique, suffix = name, 1
        while unique in taken:
            suffix += 1
            unique = f"{name}_{suffix}"
        taken.add(unique)
        return unique

    for projection in sorted(projections, key=lambda p: position[p.target.node]):
        target = projection.target
        folded = _folded_factor(model, projection)
        p_stored = projection.P.astype(np.dtype(target.dtype))
        stem = sanitize(target.name)
        digest = hashlib.sha1(p_stored.tobytes() + str(p_stored.shape).encode()).hexdigest()
        folded_name = fresh(f"{stem}.espace_PtW")
        stored = folded.T if (target.pattern == "gemm" and target.stored_transposed) else folded
        graph.initializer.append(new_initializer(np.ascontiguousarray(stored), folded_name))

        for path, activation in target.occurrences:
            holder, node = located[path]
            key = (id(holder), activation, digest)
            project_node = shared.get(key)
            if project_node is None:
                if digest not in stored_p:
                    stored_p[digest] = fresh(f"{stem}.espace_P")
                    graph.initializer.append(new_initializer(p_stored, stored_p[digest]))
                project_node = onnx.helper.make_node(
                    "MatMul",
                    [activation, stored_p[digest]],
                    [fresh(f"{stem}.espace_xp")],
                    name=fresh(f"{node.name}/espace_project"),
                )
                _tag(project_node, target.name, "project")
                shared[key] = project_node
                inserts.setdefault(id(holder), {}).setdefault(node.name, []).append(project_node)
            else:
                _append_layer(project_node, target.name)
            node.input[0] = project_node.output[0]
            node.input[1] = folded_name
            _tag(node, target.name, "expand")

    _insert_before(model, inserts)
    remove_unused_constants(model, keep_weight_inputs=keep_weight_inputs)
    return model


def _folded_factor(model: onnx.ModelProto, projection: Projection) -> np.ndarray:
    """The projection's PᵀW (given, or folded from the layer's weight) in the layer's dtype, shapes checked."""
    target = projection.target
    K, L = projection.P.shape
    if K != target.K:
        raise ValueError(f"{target.name}: P has {K} rows, the layer has K={target.K}")
    dtype = np.dtype(target.dtype)
    if projection.folded is None:
        folded_exact = fold_weight(projection.P, weight_matrix(model, target))
    elif projection.folded.shape == (L, target.N):
        folded_exact = projection.folded
    else:
        raise ValueError(f"{target.name}: folded factor is {projection.folded.shape}, expected {(L, target.N)}")
    _warn_if_out_of_range(target.name, folded_exact, dtype)
    return folded_exact.astype(dtype)


def _insert_before(model: onnx.ModelProto, inserts: dict[int, dict[str, list[onnx.NodeProto]]]) -> None:
    """Put each graph's new nodes (``inserts``: id(graph) → node name → nodes) right before the named node."""
    for scope in scopes(model):
        before = inserts.get(id(scope.graph))
        if not before:
            continue
        rewritten = []
        for node in scope.graph.node:
            rewritten.extend(before.get(node.name, []))
            rewritten.append(node)
        del scope.graph.node[:]
        scope.graph.node.extend(rewritten)


class FoldedRangeWarning(UserWarning):
    """A folded PᵀW value does not fit the model's floating-point dtype (it is stored as ±inf)."""


def _warn_if_out_of_range(layer: str, folded: np.ndarray, dtype: np.dtype) -> None:
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
        return
    limit = float(np.finfo(dtype).max) if np.issubdtype(dtype, np.floating) else 3.3895313892515355e38
    peak = float(np.abs(folded).max()) if folded.size else 0.0
    if peak > limit:
        warnings.warn(
            f"{layer}: folded PᵀW reaches |{peak:.4g}|, beyond {dtype.name} range ({limit:.4g}); "
            "those entries become inf — keep this layer dense (--exclude) or export in float32",
            FoldedRangeWarning,
            stacklevel=3,
        )


def _tag(node: onnx.NodeProto, layer: str, role: str) -> None:
    for key, value in ((ESPACE_LAYER_KEY, layer), (ESPACE_ROLE_KEY, role)):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value


def _append_layer(node: onnx.NodeProto, layer: str) -> None:
    for entry in node.metadata_props:
        if entry.key == ESPACE_LAYER_KEY:
            entry.value = f"{entry.value},{layer}"


def _names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, including from inside subgraphs (If/Loop/Scan bodies)."""
    read: set[str] = set()
    for node in nodes:
        read.update(node.input)
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                read |= _names_read(sub.node)
                read.update(o.name for o in sub.output)
    return read


def remove_unused_constants(model: onnx.ModelProto, *, keep_weight_inputs: bool = True) -> None:
    """Drop initializers, ``Constant`` nodes and weight ``Transpose`` nodes that nothing reads any more.

    An initializer that is also a graph input is part of the signature and stays, unless
    ``keep_weight_inputs`` is False (then the input goes with it)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    if keep_weight_inputs:
        initializers -= {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        for scope in scopes(model):  # dead weight Transposes inside bodies would keep the weight alive
            read = _names_read(scope.graph.node) | {o.name for o in scope.graph.output}
            dead = [
                node
                for node in scope.graph.node
                if all(o not in read for o in node.output)
                and (node.op_type == "Constant" or (node.op_type == "Transpose" and node.input[0] in initializers))
            ]
            for node in dead:
                scope.graph.node.remove(node)
            changed = changed or bool(dead)
    read = _names_read(graph.node) | outputs
    removed = initializers - read
    for index in reversed(range(len(graph.initializer))):  # in place: big tensors are never copied
        if graph.initializer[index].name in removed:
            del graph.initializer[index]
    graph_inputs = [i for i in graph.input if i.name not in removed]
    if len(graph_inputs) != len(graph.input):  # old IR versions list initializers as inputs too
        del graph.input[:]
        graph.input.extend(graph_inputs)
