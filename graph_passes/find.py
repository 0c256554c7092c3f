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
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
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
    # Further nodes reading the same weight the same way, as (node path, activation): the GEMM's copies in
    # the other branches of an If (optimum's merged decoder), rewritten with the same P.
    also: tuple[tuple[str, str], ...] = ()

    @property
    def params(self) -> int:
        return self.K * self.N

    @property
    def occurrences(self) -> tuple[tuple[str, str], ...]:
        """Every (node path, activation) this target rewrites: its node first, then ``also``."""
        return ((self.node, self.activation), *self.also)


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

    def inner(self, graph: onnx.GraphProto) -> ConstantTable:
        """The constants visible inside subgraph ``graph``: this (outer) scope's and its own."""
        table = ConstantTable(graph, self._base_dir)
        table._protos = {**self._protos, **table._protos}
        return table

    def is_outer(self, name: str, graph: onnx.GraphProto) -> bool:
        """``name`` is a constant of this scope, not defined anew inside ``graph``."""
        return name in self._protos and name not in ConstantTable(graph)._protos

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


def embedding_lookups(
    graph: onnx.GraphProto, constants: ConstantTable, int_inputs: set[str] | None = None
) -> list[tuple[str, str, int]]:
    """``(integer graph input, table, rows)`` for each 2-D constant table gathered by an integer graph input
    (token embeddings), including the word embedding of ONNX Runtime's fused ``EmbedLayerNormalization`` and a
    table gathered through a ``Transpose`` of the lm_head weight (onnxruntime-genai's tied embeddings)."""
    if int_inputs is None:
        int_inputs = {
            i.name
            for i in graph.input
            if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        }
    producers = {out: node for node in graph.node for out in node.output}
    lookups = []
    for node in graph.node:
        row_axis = 0
        if node.op_type == "EmbedLayerNormalization" and len(node.input) > 2 and node.input[2] in constants:
            table = node.input[2]
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in constants:
            table = node.input[0]
        elif (
            node.op_type == "Gather"
            and len(node.input) > 1
            and _transposed_constant(node.input[0], producers, constants)
        ):
            table, row_axis = producers[node.input[0]].input[0], 1
        else:
            continue
        if len(constants.dims(table)) != 2:
            continue
        index = node.input[0] if node.op_type == "EmbedLayerNormalization" else node.input[1]
        # the indices may pass through a Cast/Reshape/Unsqueeze before the Gather
        for _ in range(3):
            producer = producers.get(index)
            if producer is None or producer.op_type not in ("Cast", "Reshape", "Unsqueeze", "Flatten"):
                break
            index = producer.input[0]
        if index in int_inputs:
            lookups.append((index, table, int(constants.dims(table)[row_axis])))
    return lookups


def _transposed_constant(name: str, producers: dict[str, onnx.NodeProto], constants: ConstantTable) -> bool:
    """Whether ``name`` is a plain 2-D ``Transpose`` of a constant."""
    node = producers.get(name)
    if node is None or node.op_type != "Transpose" or node.input[0] not in constants:
        return False
    return len(constants.dims(node.input[0])) == 2 and _attr(node, "perm", [1, 0]) == [1, 0]


def _embedding_tables(
    graph: onnx.GraphProto, constants: ConstantTable, int_inputs: set[str] | None = None
) -> tuple[set[str], set[int]]:
    """Names and row counts of the token embedding tables (see :func:`embedding_lookups`)."""
    lookups = embedding_lookups(graph, constants, int_inputs)
    return {table for _, table, _ in lookups}, {rows for _, _, rows in lookups}


# Separates the parts of a node path: "<If node>::<then_branch|else_branch|body>::<node>" (nested as deep as
# the graph goes); a node of the main graph is named by its plain name.
SUBGRAPH_SEPARATOR = "::"


@dataclass(frozen=True)
class Scope:
    """One graph of the model (the main graph, or a subgraph of an If/Loop/Scan) and the constants it sees."""

    prefix: str  # "" for the main graph, else "<node path>::<attribute>::"
    graph: onnx.GraphProto
    constants: ConstantTable

    @property
    def is_main(self) -> bool:
        return not self.prefix


def scopes(model: onnx.ModelProto, base_dir: str = "") -> list[Scope]:
    """The main graph and every subgraph in it, depth first, each with the constants visible there."""
    found: list[Scope] = []

    def visit(prefix: str, graph: onnx.GraphProto, constants: ConstantTable) -> None:
        found.append(Scope(prefix, graph, constants))
        for node in graph.node:
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                for number, sub in enumerate(subgraphs):
                    label = attr.name if len(subgraphs) == 1 else f"{attr.name}{number}"
                    visit(
                        f"{prefix}{node.name}{SUBGRAPH_SEPARATOR}{label}{SUBGRAPH_SEPARATOR}", sub, constants.inner(sub)
                    )

    visit("", model.graph, ConstantTable(model.graph, base_dir))
    return found


def node_path(prefix: str, name: str | bytes) -> str:
    """A node's path: its plain name in the main graph (as the protobuf holds it), ``prefix + name`` inside a
    subgraph (a name that is not valid UTF-8 is decoded with replacement characters)."""
    if not prefix:
        return name  # type: ignore[return-value]
    return prefix + (name.decode("utf-8", "replace") if isinstance(name, bytes) else name)


def nodes_by_path(model: onnx.ModelProto) -> dict[str, tuple[onnx.GraphProto, onnx.NodeProto]]:
    """Every node of the model (subgraphs included) by its path, with the graph that holds it."""
    return {
        node_path(scope.prefix, node.name): (scope.graph, node) for scope in scopes(model) for node in scope.graph.node
    }


def find_targets(model: onnx.ModelProto, *, include_heads: bool = False) -> list[GemmTarget]:
    """All weight GEMMs of ``model`` in graph order, subgraphs included.

    ``role`` is ``"head"`` for output heads and embedding projections (name hints such as ``lm_head``
    or ``pooler``, an output width equal to the token-embedding vocabulary, or a weight shared with an
    embedding ``Gather``); those are returned only with ``include_heads=True``.

    GEMMs inside ``If``/``Loop``/``Scan`` bodies count when their weight is a constant of the main graph;
    the copies of one GEMM in several bodies (the two branches of optimum's merged decoder) are one target,
    its first copy as ``node``/``activation`` and the others in ``also``, so each weight gets one P. A
    model whose GEMMs are quantized also gets a :class:`QuantizedWeightsWarning` when float ones are found.
    """
    ensure_node_names(model)
    all_scopes = scopes(model)
    int_inputs = {
        i.name
        for i in model.graph.input
        if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    }
    collector = _TargetCollector(all_scopes[0].constants, include_heads)
    for scope in all_scopes:
        names, rows = _embedding_tables(scope.graph, scope.constants, int_inputs)
        collector.table_names |= names
        collector.vocab_rows |= rows
    for scope in all_scopes:
        collector.add_scope(scope)
    targets = collector.targets
    quantized = quantized_gemms(model)
    if targets and quantized:
        warnings.warn(
            f"{len(quantized)} GEMM(s) of this model have quantized weights ({_kinds(quantized)}) and stay as "
            "they are; only the float ones are compressed. Compress the float model, then quantize",
            QuantizedWeightsWarning,
            stacklevel=2,
        )
    return targets


@dataclass
class _TargetCollector:
    """:func:`find_targets`' walk over the scopes: names made unique, subgraph copies of one GEMM merged."""

    main_constants: ConstantTable
    include_heads: bool
    table_names: set[str] = field(default_factory=set)  # the token-embedding tables (any scope)
    vocab_rows: set[int] = field(default_factory=set)  # their row counts: vocabulary sizes
    targets: list[GemmTarget] = field(default_factory=list)
    used_names: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # copies of one subgraph GEMM: (weight, pattern, transposed) → index into targets
    shared: dict[tuple[str, str, bool], int] = field(default_factory=dict)

    def add_scope(self, scope: Scope) -> None:
        graph = scope.graph
        producers = {out: node for node in graph.node for out in node.output}
        matches = {index: m for index, node in enumerate(graph.node) if (m := _match(node, scope.constants, producers))}
        feeds_gemm = _feeds_any(graph, set(matches))
        for index, match in matches.items():
            node = graph.node[index]
            pattern, weight, K, N, stored_transposed, transpose_node = match
            path = node_path(scope.prefix, node.name)
            if not scope.is_main:
                if not self.main_constants.is_outer(weight, graph) or weight not in self.main_constants:
                    continue  # a weight local to the body: not rewritten (see explain_no_targets)
                key = (weight, pattern, stored_transposed)
                if key in self.shared:
                    first = self.targets[self.shared[key]]
                    self.targets[self.shared[key]] = replace(first, also=(*first.also, (path, node.input[0])))
                    continue
            name = self._unique(_layer_name(node, weight, index))
            lowered = name.lower() + " " + weight.lower()
            # A vocabulary-wide output counts as a head only when no weight GEMM follows it (an MLP's
            # intermediate width may equal the vocabulary size by coincidence).
            is_head = (
                any(hint in lowered for hint in _HEAD_NAME_HINTS)
                or weight in self.table_names
                or (N in self.vocab_rows and not feeds_gemm[index])
            )
            if is_head and not self.include_heads:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(scope.constants.elem_type(weight)).name
            if not scope.is_main:
                self.shared[(weight, pattern, stored_transposed)] = len(self.targets)
            self.targets.append(
                GemmTarget(
                    name=name,
                    node=path,
                    pattern=pattern,
                    activation=node.input[0],
                    weight=weight,
                    K=K,
                    N=N,
                    role="head" if is_head else "block",
                    dtype=dtype,
                    stored_transposed=stored_transposed,
                    transpose_node=node_path(scope.prefix, transpose_node) if transpose_node else None,
                )
            )

    def _unique(self, name: str) -> str:
        self.used_names[name] += 1
        return name if self.used_names[name] == 1 else f"{name}#{self.used_names[name]}"


class QuantizedWeightsWarning(UserWarning):
    """Some GEMMs of the model have quantized weights, which ESPACE does not rewrite."""


# Operators whose weight is stored quantized: what to call them in a message.
QUANTIZED_OPS = {
    "MatMulNBits": "MatMulNBits (4/8-bit block-quantized weights)",
    "MatMulBnb4": "MatMulBnb4 (4-bit weights)",
    "MatMulInteger": "MatMulInteger (int8 weights, quantize_dynamic)",
    "DynamicQuantizeMatMul": "DynamicQuantizeMatMul (int8 weights)",
    "MatMulIntegerToFloat": "MatMulIntegerToFloat (int8 weights)",
    "QLinearMatMul": "QLinearMatMul (int8 weights)",
    "QGemm": "QGemm (int8 weights)",
    "QAttention": "QAttention (int8 weights)",
    "GatherBlockQuantized": None,  # a quantized embedding, not a GEMM
}
_QDQ = "MatMul/Gemm fed by DequantizeLinear (QDQ-quantized weights)"


def quantized_gemms(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node path, what it is) of every GEMM whose weight is quantized: quantized contrib ops, and
    MatMul/Gemm reading a ``DequantizeLinear`` of a constant (QDQ graphs)."""
    found = []
    for scope in scopes(model):
        producers = {out: node for node in scope.graph.node for out in node.output}
        for node in scope.graph.node:
            kind = QUANTIZED_OPS.get(node.op_type)
            if kind:
                found.append((node_path(scope.prefix, node.name), kind))
            elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                producer = producers.get(node.input[1])
                if producer is not None and producer.op_type == "Transpose":
                    producer = producers.get(producer.input[0])
                if (
                    producer is not None
                    and producer.op_type == "DequantizeLinear"
                    and producer.input[0] in scope.constants
                ):
                    found.append((node_path(scope.prefix, node.name), _QDQ))
    return found


def _kinds(found: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for _, kind in found:
        counts[kind] += 1
    return ", ".join(f"{count}× {kind}" for kind, count in counts.items())


def explain_no_targets(model: onnx.ModelProto, *, include_heads: bool = False) -> tuple[str, str]:
    """Why :func:`find_targets` found nothing in ``model``, and the fix, as (problem, fix) for a one-line
    error: quantized weights, heads only, weights that are graph inputs or pass through foldable nodes,
    GEMMs whose weight lives inside a subgraph body, or no GEMM at all."""
    quantized = quantized_gemms(model)
    heads = []
    if not include_heads:
        with warnings.catch_warnings():  # the caller has warned about the quantized GEMMs already
            warnings.simplefilter("ignore", QuantizedWeightsWarning)
            heads = find_targets(model, include_heads=True)
    if quantized and heads:  # genai's int4 with the lm_head left float (nodes_to_exclude), say
        return (
            f"has no float transformer-block GEMM to compress: those are quantized ({_kinds(quantized)}); only "
            f"its output heads are float ({', '.join(t.name for t in heads[:3])}{'…' if len(heads) > 3 else ''})",
            "ESPACE rewrites float weights: compress the float model, then quantize it "
            "(--include-heads compresses the float heads alone)",
        )
    if quantized:
        return (
            f"has no float GEMM weight to compress: its GEMMs are quantized ({_kinds(quantized)})",
            "ESPACE rewrites float weights: compress the float model, then quantize it",
        )
    if heads:
        return (
            "has no transformer-block GEMM, only output heads (lm_head, pooler, classifier)",
            "pass --include-heads to compress the heads",
        )
    inputs = {i.name for i in model.graph.input}
    gemms = [
        (scope, node)
        for scope in scopes(model)
        for node in scope.graph.node
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
    ]
    if not gemms:
        ops = sorted({node.op_type for scope in scopes(model) for node in scope.graph.node})
        return (
            f"has no MatMul or Gemm node (operators: {', '.join(ops[:12])}{'…' if len(ops) > 12 else ''})",
            "espace-export compresses MatMul/Gemm layers: export the model without fused GEMM operators",
        )
    for _scope, node in gemms:
        if node.input[1] in inputs:
            return (
                f"reads its GEMM weights from graph inputs (e.g. '{node.input[1]}'), not from constants",
                "export with the weights stored in the model (torch.onnx.export(..., export_params=True))",
            )
    for scope, node in gemms:
        if node.input[1] in scope.constants and not scope.is_main:
            return (
                f"keeps its GEMM weights inside a subgraph body (e.g. '{node.input[1]}' in {scope.prefix[:-2]})",
                "store the weights as initializers of the main graph (optimum's merge_decoders does)",
            )
    return (
        "has no MatMul/Gemm with a 2-D constant weight (weights are computed by other nodes)",
        "fold constants first (torch.onnx.export(..., do_constant_folding=True), or onnxslim / onnxsim)",
    )


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
    if node.op_type == "MatMul" or (node.op_type == "Attention" and node.domain == "com.microsoft"):
        # com.microsoft Attention reads X·W with its packed QKV weight [K, 3N] as input 1, and takes any
        # input width K: the projected pair is Attention(X·P, PᵀW) with the same attributes.
        if b in constants:
            dims = constants.dims(b)
            if len(dims) == 2 and constants.elem_type(b) in _FLOAT_TYPES:
                return "matmul", b, dims[0], dims[1], False, None
            return None
        if node.op_type != "MatMul":
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
    """The projected pairs written by :func:`graph_passes.project.project`, found through their node tags
    (in subgraphs too; a layer rewritten in several branches is one pair, its first copy)."""
    tagged: dict[str, dict[str, tuple[str, onnx.NodeProto, ConstantTable]]] = defaultdict(dict)
    for scope in scopes(model):
        for node in scope.graph.node:
            props = {p.key: p.value for p in node.metadata_props}
            if ESPACE_LAYER_KEY in props:
                for layer in props[ESPACE_LAYER_KEY].split(","):
                    tagged[layer].setdefault(props.get(ESPACE_ROLE_KEY, ""), (scope.prefix, node, scope.constants))
    pairs = []
    for layer, roles in tagged.items():
        if "project" not in roles or "expand" not in roles:
            continue
        prefix, project_node, constants = roles["project"]
        K, L = constants.dims(project_node.input[1])
        _, expand, expand_constants = roles["expand"]
        dims = expand_constants.dims(expand.input[1])
        trans_b = expand.op_type == "Gemm" and bool(_attr(expand, "transB", 0))
        N = dims[0] if trans_b else dims[1]
        pairs.append(
            ProjectedPair(
                layer, node_path(prefix, project_node.name), node_path(roles["expand"][0], expand.name), K, L, N
            )
        )
    return pairs


def sanitize(name: str) -> str:
    """A tensor-name-safe form of a layer name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node (of the main graph and of each subgraph) a name unique in its graph
    (``<op>_<index>``); named nodes keep theirs."""

    def name_nodes(graph: onnx.GraphProto) -> None:
        taken = {node.name for node in graph.node if node.name}
        for index, node in enumerate(graph.node):
            if not node.name:
                name = f"{node.op_type}_{index}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    name_nodes(sub)

    name_nodes(model.graph)


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements stored in the graph's constants (initializers and ``Constant`` nodes)."""
    constants = ConstantTable(model.graph)
    return sum(int(np.prod(constants.dims(name), dtype=np.int64)) for name in constants.names())


def external_data_dir(model: onnx.ModelProto) -> str:
    """Where the model's unloaded external data lives ("" when everything is in memory)."""
    return next((p.value for p in model.metadata_props if p.key == EXTERNAL_DIR_KEY), "")
