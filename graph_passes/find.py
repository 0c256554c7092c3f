"""Find the weight GEMMs that ESPACE can compress.

Matches, in any graph the PyTorch exporters (TorchScript and dynamo) or other tools produce:

- ``MatMul(X, W)`` where W is a 2-D constant ``[K, N]`` (an initializer or a ``Constant`` node);
- ``Gemm(X, B[, C])`` with ``transA = 0``, B a 2-D constant stored ``[K, N]`` (``transB = 0``,
  GPT-2's Conv1D) or ``[N, K]`` (``transB = 1``, ``nn.Linear`` through the TorchScript exporter);
- ``MatMul(X, Transpose(W))`` with ``perm = [1, 0]`` and W a 2-D constant ``[N, K]``, where W may
  also feed a ``Gather`` (tied input/output embeddings).

Guarantees: every returned target names an existing node, its activation input, and a weight
whose ``K × N`` view :func:`weight_matrix` returns; targets keep graph order. The only change the
pass makes to the model is naming unnamed nodes (:func:`ensure_node_names`), so targets can name them.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

Pattern = Literal["matmul", "gemm", "matmul_transposed"]
Role = Literal["block", "head"]

# Layer names that mark an output head or embedding projection rather than a transformer block GEMM
# (the paper compresses only QKV, Proj, FC1 and FC2).
_HEAD_NAME_HINTS = ("lm_head", "pooler", "classifier", "embed_out", "score")
# Model metadata naming the directory of weights still on disk (set by loaders that leave external data
# unloaded; never saved).
EXTERNAL_DIR_KEY = "espace.external_data_dir"
# Tag written on the nodes :mod:`graph_passes.project` creates, so a compressed graph can be read back.
ESPACE_LAYER_KEY = "espace.layer"
ESPACE_ROLE_KEY = "espace.role"
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass(frozen=True)
class GemmTarget:
    """One weight GEMM ``Y = X·W`` with ``X: [..., K]`` and ``W: K × N``."""

    name: str  # layer name, e.g. "model.layers.0.self_attn.q_proj"
    node: str  # name of the MatMul/Gemm node
    pattern: Pattern
    activation: str  # tensor X
    weight: str  # the constant as stored: [K, N], or [N, K] for gemm+transB and matmul_transposed
    K: int
    N: int
    role: Role
    dtype: str  # numpy name of the weight dtype ("float32", "float16", ...)
    stored_transposed: bool = False  # the constant is stored [N, K]
    transpose_node: str | None = None  # the Transpose node, for matmul_transposed

    @property
    def params(self) -> int:
        return self.K * self.N


@dataclass(frozen=True)
class ProjectedPair:
    """A GEMM already rewritten by :func:`graph_passes.project.project`: ``(X·P)·(PᵀW)``."""

    name: str
    project_node: str  # MatMul(X, P)
    expand_node: str  # MatMul/Gemm(X·P, PᵀW)
    K: int
    L: int
    N: int


class ConstantTable:
    """Constant tensors of a graph, from initializers and ``Constant`` nodes, read lazily."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str = "") -> None:
        self._base_dir = base_dir
        self._protos: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.output) == 1:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self._protos[node.output[0]] = attr.t

    def names(self) -> list[str]:
        return list(self._protos)

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def dims(self, name: str) -> list[int]:
        return list(self._protos[name].dims)

    def elem_type(self, name: str) -> int:
        return int(self._protos[name].data_type)

    def array(self, name: str) -> np.ndarray:
        """The tensor's values; external data not yet loaded is read from disk (relative to ``base_dir``)."""
        return numpy_helper.to_array(self._protos[name], self._base_dir)


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _module_path_from_scopes(node: onnx.NodeProto) -> str | None:
    """The innermost module path the dynamo exporter records in ``pkg.torch.onnx.name_scopes``."""
    for prop in node.metadata_props:
        if prop.key != "pkg.torch.onnx.name_scopes":
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return None
        path = ""
        for scope in scopes:
            if not scope:
                continue
            if not path or scope.startswith(path + "."):
                path = scope
            else:
                break
        return path or None
    return None


def _module_path_from_node_name(node_name: str) -> str | None:
    """``/model/layers.0/self_attn/q_proj/MatMul`` (TorchScript exporter) → ``model.layers.0.self_attn.q_proj``."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.strip("/").split("/") if p]
    return ".".join(parts[:-1]) or None


def _layer_name(node: onnx.NodeProto, weight: str, index: int) -> str:
    for candidate in (_module_path_from_scopes(node), _module_path_from_node_name(node.name)):
        if candidate:
            return candidate
    if weight.endswith(".weight"):
        return weight[: -len(".weight")]
    return node.name or f"gemm_{index}"


def _embedding_tables(graph: onnx.GraphProto, constants: ConstantTable) -> tuple[set[str], set[int]]:
    """Names and row counts of 2-D constant tables gathered by integer graph inputs (token embeddings)."""
    int_inputs = {
        i.name for i in graph.input if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    }
    producers = {out: node for node in graph.node for out in node.output}
    names: set[str] = set()
    rows: set[int] = set()
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in constants:
            continue
        if len(constants.dims(node.input[0])) != 2:
            continue
        index = node.input[1]
        # the indices may pass through a Cast/Reshape/Unsqueeze before the Gather
        for _ in range(3):
            producer = producers.get(index)
            if producer is None or producer.op_type not in ("Cast", "Reshape", "Unsqueeze", "Flatten"):
                break
            index = producer.input[0]
        if index in int_inputs:
            names.add(node.input[0])
            rows.add(constants.dims(node.input[0])[0])
    return names, rows


def find_targets(model: onnx.ModelProto, *, include_heads: bool = False) -> list[GemmTarget]:
    """All weight GEMMs of ``model`` in graph order.

    ``role`` is ``"head"`` for output heads and embedding projections (name hints such as ``lm_head``
    or ``pooler``, an output width equal to the token-embedding vocabulary, or a weight shared with an
    embedding ``Gather``); those are returned only with ``include_heads=True``.
    """
    ensure_node_names(model)
    graph = model.graph
    constants = ConstantTable(graph)
    producers = {out: node for node in graph.node for out in node.output}
    table_names, vocab_rows = _embedding_tables(graph, constants)
    used_names: dict[str, int] = defaultdict(int)
    targets: list[GemmTarget] = []
    matches = {index: m for index, node in enumerate(graph.node) if (m := _match(node, constants, producers))}
    feeds_gemm = _feeds_any(graph, set(matches))

    for index, match in matches.items():
        node = graph.node[index]
        pattern, weight, K, N, stored_transposed, transpose_node = match
        name = _layer_name(node, weight, index)
        used_names[name] += 1
        if used_names[name] > 1:
            name = f"{name}#{used_names[name]}"
        lowered = name.lower() + " " + weight.lower()
        # A vocabulary-wide output counts as a head only when no weight GEMM follows it (an MLP's
        # intermediate width may equal the vocabulary size by coincidence).
        is_head = (
            any(hint in lowered for hint in _HEAD_NAME_HINTS)
            or weight in table_names
            or (N in vocab_rows and not feeds_gemm[index])
        )
        if is_head and not include_heads:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(constants.elem_type(weight)).name
        targets.append(
            GemmTarget(
                name=name,
                node=node.name,
                pattern=pattern,
                activation=node.input[0],
                weight=weight,
                K=K,
                N=N,
                role="head" if is_head else "block",
                dtype=dtype,
                stored_transposed=stored_transposed,
                transpose_node=transpose_node,
            )
        )
    return targets


def _feeds_any(graph: onnx.GraphProto, gemm_indices: set[int]) -> list[bool]:
    """For each node, whether any of ``gemm_indices`` lies downstream of it (one reverse sweep; nodes are
    topologically sorted in a valid model)."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(index)
    feeds = [False] * len(graph.node)
    for index in reversed(range(len(graph.node))):
        feeds[index] = any(
            c in gemm_indices or feeds[c]
            for out in graph.node[index].output
            for c in consumers.get(out, ())
            if c > index
        )
    return feeds


def _match(
    node: onnx.NodeProto, constants: ConstantTable, producers: dict[str, onnx.NodeProto]
) -> tuple[Pattern, str, int, int, bool, str | None] | None:
    if len(node.input) < 2:
        return None
    b = node.input[1]
    if node.op_type == "MatMul":
        if b in constants:
            dims = constants.dims(b)
            if len(dims) == 2 and constants.elem_type(b) in _FLOAT_TYPES:
                return "matmul", b, dims[0], dims[1], False, None
            return None
        transpose = producers.get(b)
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in constants:
            w = transpose.input[0]
            dims = constants.dims(w)
            perm = list(_attr(transpose, "perm", [1, 0]))  # type: ignore[call-overload]
            if len(dims) == 2 and perm == [1, 0] and constants.elem_type(w) in _FLOAT_TYPES:
                return "matmul_transposed", w, dims[1], dims[0], True, transpose.name or None
        return None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or b not in constants:
            return None
        dims = constants.dims(b)
        if len(dims) != 2 or constants.elem_type(b) not in _FLOAT_TYPES:
            return None
        if _attr(node, "transB", 0):
            return "gemm", b, dims[1], dims[0], True, None
        return "gemm", b, dims[0], dims[1], False, None
    return None


def group_by_activation(targets: list[GemmTarget]) -> dict[str, list[GemmTarget]]:
    """Targets that read the same activation tensor (Q/K/V, gate/up), keyed by that tensor, in order."""
    groups: dict[str, list[GemmTarget]] = {}
    for target in targets:
        groups.setdefault(target.activation, []).append(target)
    return groups


def weight_matrix(model: onnx.ModelProto, target: GemmTarget) -> np.ndarray:
    """The target's weight as the ``K × N`` matrix of ``Y = X·W``, in its stored dtype."""
    array = ConstantTable(model.graph, external_data_dir(model)).array(target.weight)
    return array.T if target.stored_transposed else array


def find_projected_pairs(model: onnx.ModelProto) -> list[ProjectedPair]:
    """The projected pairs written by :func:`graph_passes.project.project`, found through their node tags."""
    constants = ConstantTable(model.graph)
    tagged: dict[str, dict[str, onnx.NodeProto]] = defaultdict(dict)
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if ESPACE_LAYER_KEY in props:
            for layer in props[ESPACE_LAYER_KEY].split(","):
                tagged[layer][props.get(ESPACE_ROLE_KEY, "")] = node
    pairs = []
    for layer, roles in tagged.items():
        if "project" not in roles or "expand" not in roles:
            continue
        K, L = constants.dims(roles["project"].input[1])
        expand = roles["expand"]
        dims = constants.dims(expand.input[1])
        trans_b = expand.op_type == "Gemm" and bool(_attr(expand, "transB", 0))
        N = dims[0] if trans_b else dims[1]
        pairs.append(ProjectedPair(layer, roles["project"].name, expand.name, K, L, N))
    return pairs


def sanitize(name: str) -> str:
    """A tensor-name-safe form of a layer name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node of the main graph a unique name (``<op>_<index>``); named nodes keep theirs."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements stored in the graph's constants (initializers and ``Constant`` nodes)."""
    constants = ConstantTable(model.graph)
    return sum(int(np.prod(constants.dims(name), dtype=np.int64)) for name in constants.names())


def external_data_dir(model: onnx.ModelProto) -> str:
    """Where the model's unloaded external data lives ("" when everything is in memory)."""
    return next((p.value for p in model.metadata_props if p.key == EXTERNAL_DIR_KEY), "")
