"""Small ONNX graphs built by hand, one for every weight-GEMM pattern the passes must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, WIDE = 50, 16, 24


def pattern_zoo(seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    """Every pattern in one graph.

    ids ─Gather(E)─► emb ─┬ MatMul(Wq) ─► q ┐
                          └ MatMul(Wk) ─► k ┴ Add ─ Relu ─► r ─ MatMul(Constant Wc, unnamed node) ─► f
    f ─ MatMul(Transpose(E)) ─► logits                  (tied head: E is also the embedding table)
    x2 ─ Gemm(B1ᵀ, C1, transB=1) ─► g1 ─ Gemm(B2, transB=0) ─► y2
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype), name)

    initializers = [
        w("E", VOCAB, HIDDEN),
        w("Wq", HIDDEN, WIDE),
        w("Wk", HIDDEN, WIDE),
        w("B1", WIDE, HIDDEN),  # stored N×K for transB=1
        w("C1", WIDE),
        w("B2", WIDE, HIDDEN),  # stored K×N
    ]
    constant_weight = numpy_helper.from_array((rng.standard_normal((WIDE, HIDDEN)) / 5).astype(dtype), "Wc")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "Wq"], ["q"], name="/layers.0/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["emb", "Wk"], ["k"], name="/layers.0/attn/k_proj/MatMul"),
        helper.make_node("Add", ["q", "k"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["Wc_out"], value=constant_weight),
        helper.make_node("MatMul", ["r", "Wc_out"], ["f"]),  # unnamed on purpose
        helper.make_node("Transpose", ["E"], ["E_t"], name="tie_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "E_t"], ["logits"], name="/lm_head/MatMul"),
        helper.make_node("Gemm", ["x2", "B1", "C1"], ["g1"], name="/fc1/Gemm", transB=1),
        helper.make_node("Gemm", ["g1", "B2"], ["y2"], name="/fc2/Gemm"),
    ]
    graph = helper.make_graph(
        nodes,
        "pattern_zoo",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("x2", elem, ["rows", HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("logits", elem, ["batch", "seq", VOCAB]),
            helper.make_tensor_value_info("y2", elem, ["rows", HIDDEN]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zoo_feed(batch: int = 3, seq: int = 5, rows: int = 7, seed: int = 1, dtype: type = np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "ids": rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64),
        "x2": rng.standard_normal((rows, HIDDEN)).astype(dtype),
    }


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)
