"""Calibration statistics: host and in-graph reductions agree; padding is excluded; sums are exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from espace_export.calibration.statistics import ActivationStats, StatisticsSettings, collect_statistics
from espace_export.runtime import ort_session
from espace_export.selection.candidates import autocorrelation, normalized_autocorrelation
from graph_passes import find_targets
from graph_passes.statistics import add_gram_outputs


def test_activation_stats_match_the_definitions() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 12)) * np.linspace(0.1, 3, 12)
    X[5] = 0.0  # a zero row has no direction: excluded from the normalised statistics only
    stats = ActivationStats(12)
    for chunk in np.array_split(X, 4):
        stats.add(chunk, "float64")
    np.testing.assert_allclose(stats.C_X, autocorrelation(X), rtol=1e-12)
    np.testing.assert_allclose(stats.C_X_normalized, normalized_autocorrelation(X), rtol=1e-12)
    assert (stats.rows, stats.rows_normalized) == (300, 299)
    other = ActivationStats(12)
    other.add(X, "float64")
    stats.merge(other)
    np.testing.assert_allclose(stats.C_X, autocorrelation(X), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), [("llama", "dynamo"), ("gpt2", "torchscript"), ("bert", "torchscript")])
def test_in_graph_reduction_equals_host_reduction(arch: str, exporter: str, sample_model: Callable[..., Path]) -> None:
    from samples.make_models import sample_inputs

    model = onnx.load(str(sample_model(arch, exporter)))
    targets = find_targets(model)
    batches = [sample_inputs(arch, 3, 12, seed=s) for s in range(2)]  # right-padded rows included
    host = collect_statistics(ort_session, model, targets, batches, StatisticsSettings("float64", reduce="host"))
    graph = collect_statistics(ort_session, model, targets, batches, StatisticsSettings("float64", reduce="graph"))
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name in host:
        assert host[name].rows == graph[name].rows == real_tokens
        assert host[name].rows_normalized == graph[name].rows_normalized
        np.testing.assert_allclose(graph[name].sum_xx, host[name].sum_xx, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(graph[name].sum_xx_normalized, host[name].sum_xx_normalized, rtol=1e-9, atol=1e-9)


def test_gram_pass_rejects_old_opsets() -> None:
    model = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 11)]
    )
    with pytest.raises(ValueError, match="opset"):
        add_gram_outputs(model, {"x": 4})
