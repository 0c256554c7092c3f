"""Gradients for NL-MSE: the ONNX→torch interpreter, finite differences, the per-sequence statistic."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from espace_export.io.data import complete_feed, input_specs
from graph_passes import find_targets

torch = pytest.importorskip("torch")


def _feed(model: onnx.ModelProto, batch: int = 2, seq: int = 7, vocab: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, seq - 2 :] = 0  # right padding on the last sequence
    return complete_feed({"input_ids": ids, "attention_mask": mask}, input_specs(model))


@pytest.mark.parametrize(("arch", "exporter"), [("llama", "torchscript"), ("gpt2", "torchscript"), ("bert", "dynamo")])
def test_interpreter_matches_onnxruntime(sample_model, arch: str, exporter: str) -> None:
    import onnxruntime as ort

    from espace_export.calibration.onnx_torch import TorchGraph

    path = sample_model(arch, exporter)
    model = onnx.load(path)
    feed = _feed(model)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = next(iter(TorchGraph(model).run(feed).values())).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("arch", "loss"), [("llama", "next-token"), ("bert", "probe")])
def test_activation_gradients_match_finite_differences(sample_model, arch: str, loss: str) -> None:
    from espace_export.calibration.gradients import _graph_forward, output_loss
    from espace_export.calibration.onnx_torch import TorchGraph

    model = onnx.load(sample_model(arch, "torchscript"))
    graph = TorchGraph(model, float64=True)
    feed = _feed(model)
    targets = find_targets(model)
    # the first block input and an inner one (attention output): gradients flow through later watched tensors
    watched = [targets[0].activation, targets[3].activation]
    output, tracked = _graph_forward(graph, set(watched))(feed)
    grads = torch.autograd.grad(output_loss(loss, output, feed, seed=3), [tracked[n] for n in watched])

    rng = np.random.default_rng(1)
    for name, grad in zip(watched, grads, strict=True):
        direction = torch.from_numpy(rng.standard_normal(tuple(grad.shape)))
        eps = 1e-5

        def loss_at(shift: float, name: str = name, direction=direction) -> float:
            def watch(tensor_name: str, value):
                return value + shift * direction if tensor_name == name else value

            out = next(iter(graph.run(feed, watch=watch).values()))
            return float(output_loss(loss, out, feed, seed=3))

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_sequence_statistic_on_a_hand_checkable_case() -> None:
    from espace_export.calibration.gradients import GradientStats, sequence_statistic

    X = np.array([[1.0, 0.0], [0.0, 2.0]])  # XᵀX = diag(1, 4)
    G = np.array([[3.0, 0.0], [0.0, 1.0]])  # GᵀG = diag(9, 1)
    np.testing.assert_allclose(sequence_statistic(X, G), np.diag([9.0, 4.0]) / 4)  # M = 2
    stats = GradientStats(2)
    stats.add(X, G)
    stats.add(2 * X, G)  # (4·XᵀX)(GᵀG)/4
    np.testing.assert_allclose(stats.C_XG, (np.diag([9.0, 4.0]) / 4 + np.diag([36.0, 16.0]) / 4) / 2)
    np.testing.assert_allclose(stats.C_XG_normalized, np.eye(2) / 4)  # unit rows: XᵀX = GᵀG = I, M = 2


def test_onnx_graph_and_pytorch_module_give_the_same_statistics(sample_model) -> None:
    from espace_export.calibration.gradients import collect_gradient_statistics
    from samples.make_models import build_model

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    batches = [_feed(model)]
    from_graph = collect_gradient_statistics(model, targets, batches)
    module = build_model("llama")  # same seed and sizes as the fixture's export
    wrapped = module.model  # the HF model: names without the wrapper's "model." prefix
    from_module = collect_gradient_statistics(model, targets, batches, torch_module=wrapped)
    assert from_graph.keys() == from_module.keys()
    for name in from_graph:
        assert from_graph[name].sequences == 2
        scale = np.abs(from_graph[name].C_XG).max()
        np.testing.assert_allclose(from_module[name].C_XG, from_graph[name].C_XG, atol=1e-4 * scale)
        np.testing.assert_allclose(from_module[name].C_XG_normalized, from_graph[name].C_XG_normalized, atol=1e-4)
