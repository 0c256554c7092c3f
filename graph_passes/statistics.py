"""Augment a graph so it reduces activation statistics itself.

For each requested activation ``x`` (any shape ``[..., K]``) the pass adds nodes computing, per run,

    X  = Reshape(x, [-1, K])  (cast to float32 or float64)
    Xm = X ⊙ mask              (rows of padding tokens zeroed, when the activation lines up with the mask)
    G  = Gemm(Xm, Xm, transA=1)                 → output ``<x>::espace_gram``        Σ x xᵀ
    n² = ReduceSum(Xm², axis 1)
    Gn = Gemm(Xn, Xn, transA=1), Xn = Xm / ‖x‖  → output ``<x>::espace_gram_l2``     Σ x xᵀ/‖x‖²  (optional)
    rows, rows_l2                               → outputs ``<x>::espace_rows[_l2]``  (float counts)

so a calibration run returns K×K sums rather than M×K activations: the products run in the runtime's own
GEMM kernels and the activations never leave it. Requires opset ≥ 13 (ReduceSum takes ``axes`` as an
input). The original outputs stay; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GRAM_SUFFIX = "::espace_gram"
GRAM_L2_SUFFIX = "::espace_gram_l2"
ROWS_SUFFIX = "::espace_rows"
ROWS_L2_SUFFIX = "::espace_rows_l2"
MIN_OPSET = 13


@dataclass(frozen=True)
class GramOutputs:
    gram: str
    rows: str
    gram_l2: str | None
    rows_l2: str | None


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def add_gram_outputs(
    model: onnx.ModelProto,
    activations: dict[str, int],
    *,
    mask_input: str | None = None,
    masked: set[str] | frozenset[str] = frozenset(),
    normalized: bool = False,
    precision: str = "float32",
) -> tuple[onnx.ModelProto, dict[str, GramOutputs]]:
    """A copy of ``model`` that also outputs the Gram sums of ``activations`` (name → K).

    Activations in ``masked`` are multiplied row-wise by ``mask_input`` (an attention mask whose size
    equals their row count) so padding contributes nothing.
    """
    if default_opset(model) < MIN_OPSET:
        raise ValueError(f"in-graph reduction needs opset >= {MIN_OPSET}, the model has {default_opset(model)}")
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    dtype = TensorProto.DOUBLE if precision == "float64" else TensorProto.FLOAT
    np_dtype = np.float64 if precision == "float64" else np.float32
    nodes: list[onnx.NodeProto] = []
    outputs: dict[str, GramOutputs] = {}

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    axis_one = const("espace_stats::axis1", np.array([1], dtype=np.int64))
    zero_index = const("espace_stats::zero_index", np.array(0, dtype=np.int64))
    tiny = const("espace_stats::tiny", np.array(np.finfo(np_dtype).tiny, dtype=np_dtype))
    mask_column = None
    if mask_input is not None and masked:
        minus_one_one = const("espace_stats::shape_col", np.array([-1, 1], dtype=np.int64))
        nodes += [
            helper.make_node("Reshape", [mask_input, minus_one_one], ["espace_stats::mask_i"]),
            helper.make_node("Cast", ["espace_stats::mask_i"], ["espace_stats::mask"], to=dtype),
        ]
        mask_column = "espace_stats::mask"

    for index, (name, K) in enumerate(activations.items()):
        p = f"espace_stats::{index}"
        shape = const(f"{p}::shape", np.array([-1, K], dtype=np.int64))
        nodes += [
            helper.make_node("Reshape", [name, shape], [f"{p}::x2"]),
            helper.make_node("Cast", [f"{p}::x2"], [f"{p}::x"], to=dtype),
        ]
        x = f"{p}::x"
        if mask_column is not None and name in masked:
            nodes.append(helper.make_node("Mul", [x, mask_column], [f"{p}::xm"]))
            x = f"{p}::xm"
            rows_source = [helper.make_node("ReduceSum", [mask_column], [name + ROWS_SUFFIX], keepdims=0)]
        else:
            nodes += [
                helper.make_node("Shape", [x], [f"{p}::shape_x"]),
                helper.make_node("Gather", [f"{p}::shape_x", zero_index], [f"{p}::rows_i"], axis=0),
                helper.make_node("Cast", [f"{p}::rows_i"], [name + ROWS_SUFFIX], to=dtype),
            ]
            rows_source = []
        nodes += rows_source
        nodes.append(helper.make_node("Gemm", [x, x], [name + GRAM_SUFFIX], transA=1))
        gram_l2 = rows_l2 = None
        if normalized:
            zero = const(f"{p}::zero", np.array(0, dtype=np_dtype))
            nodes += _normalized_gram_nodes(p, x, name, dtype, (axis_one, tiny, zero))
            gram_l2, rows_l2 = name + GRAM_L2_SUFFIX, name + ROWS_L2_SUFFIX
        outputs[name] = GramOutputs(name + GRAM_SUFFIX, name + ROWS_SUFFIX, gram_l2, rows_l2)
        graph.output.append(helper.make_tensor_value_info(name + GRAM_SUFFIX, dtype, [K, K]))
        graph.output.append(helper.make_tensor_value_info(name + ROWS_SUFFIX, dtype, []))
        if normalized:
            graph.output.append(helper.make_tensor_value_info(name + GRAM_L2_SUFFIX, dtype, [K, K]))
            graph.output.append(helper.make_tensor_value_info(name + ROWS_L2_SUFFIX, dtype, []))
    for i, node in enumerate(nodes):
        node.name = f"espace_stats/{node.op_type}_{i}"
    graph.node.extend(nodes)
    return augmented, outputs


def _normalized_gram_nodes(
    p: str, x: str, name: str, dtype: int, constants: tuple[str, str, str]
) -> list[onnx.NodeProto]:
    """Nodes for the Gram sum of ``x``'s rows scaled to unit L2 norm, and the count of its nonzero rows
    (``constants``: the names of the axis-1 list, the dtype's smallest normal number and zero)."""
    axis_one, tiny, zero = constants
    return [
        helper.make_node("Mul", [x, x], [f"{p}::sq"]),
        helper.make_node("ReduceSum", [f"{p}::sq", axis_one], [f"{p}::n2"], keepdims=1),
        helper.make_node("Sqrt", [f"{p}::n2"], [f"{p}::n"]),
        helper.make_node("Max", [f"{p}::n", tiny], [f"{p}::n_safe"]),
        helper.make_node("Div", [x, f"{p}::n_safe"], [f"{p}::xn"]),
        helper.make_node("Gemm", [f"{p}::xn", f"{p}::xn"], [name + GRAM_L2_SUFFIX], transA=1),
        helper.make_node("Greater", [f"{p}::n2", zero], [f"{p}::nonzero"]),
        helper.make_node("Cast", [f"{p}::nonzero"], [f"{p}::nonzero_f"], to=dtype),
        helper.make_node("ReduceSum", [f"{p}::nonzero_f"], [name + ROWS_L2_SUFFIX], keepdims=0),
    ]
