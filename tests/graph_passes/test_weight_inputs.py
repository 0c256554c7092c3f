"""Models that list their weights as graph inputs (IR 3 requires it, IR 4 allows it) keep their signature."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.find import find_targets
from graph_passes.project import Projection, project


def weights_as_inputs(ir_version: int, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((16, 16)), "w2": rng.standard_normal((16, 8))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "weights_as_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])]
        + [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in weights.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model, weights


def signature(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type)) for v in list(model.graph.input) + list(model.graph.output)]


@pytest.mark.parametrize(("ir_version", "opset"), [(3, 7), (4, 9)])
def test_weight_inputs_survive_the_rewrite(ir_version: int, opset: int) -> None:
    model, weights = weights_as_inputs(ir_version, opset)
    before = signature(model)
    targets = find_targets(model)
    assert [t.name for t in targets] == ["fc1", "fc2"]
    P = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))[0][:, :4]
    project(model, [Projection(t, P) for t in targets])
    onnx.checker.check_model(model, full_check=True)
    assert signature(model) == before
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [i.name for i in session.get_overridable_initializers()] == ["w1", "w2"]
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    PPt = (P @ P.T).astype(np.float64)
    expected = np.maximum(x @ PPt @ weights["w1"], 0) @ PPt @ weights["w2"]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_dropping_weight_inputs_is_a_choice() -> None:
    model, _ = weights_as_inputs(4, 9)
    P = np.eye(16, dtype=np.float32)[:, :4]
    project(model, [Projection(t, P) for t in find_targets(model)], keep_weight_inputs=False)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["x"]
    assert not {"w1", "w2"} & {t.name for t in model.graph.initializer}
