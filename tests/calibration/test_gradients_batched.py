"""The batched NL-MSE reduction (one GEMM per batch) against the per-sequence reference statistic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest

from espace_export.io.data import complete_feed, input_specs
from graph_passes import find_targets

torch = pytest.importorskip("torch")

from espace_export.calibration.gradients import (  # noqa: E402
    GradientStats,
    _reduce_sequences,
    batch_statistic,
    collect_gradient_statistics,
)

RTOL = 1e-10


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _reference(X: np.ndarray, G: np.ndarray, mask: np.ndarray | None, normalized: bool = True) -> GradientStats:
    """Today's statistic: each sequence's valid rows through GradientStats.add (numpy, per sequence)."""
    stats = GradientStats(X.shape[-1], normalized)
    for row in range(X.shape[0]):
        valid = np.ones(X.shape[1], bool) if mask is None else mask[row].astype(bool)
        stats.add(X[row][valid], G[row][valid])
    return stats


def _padded_batch(batch: int, seq: int, K: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float32 X, G with varied valid lengths, left and right padding, and one fully padded sequence."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((batch, seq, K)) * rng.uniform(0.1, 10, size=K)).astype(np.float32)
    G = rng.standard_normal((batch, seq, K)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq // 3 :] = 0  # right padding
    mask[2, :] = 0  # a sequence with no valid token: not counted
    mask[3, : seq // 2] = 0  # left padding
    mask[4, 1:] = 0  # M = 1
    X[mask == 0] = np.nan  # whatever sits at padded positions must not leak in
    G[1, -1] = np.inf
    return X, G, mask


@pytest.mark.parametrize(
    ("seq", "K"),
    [(16, 48), (40, 3), (1, 8)],
    ids=["M<K: (XGᵀ)G form", "M≫K: XᵀX·GᵀG form", "one token"],
)
def test_batched_statistic_equals_the_per_sequence_reference(seq: int, K: int) -> None:
    X, G, mask = _padded_batch(6, seq, K, seed=seq + K)
    expected = _reference(X, G, mask)
    got = GradientStats(K)
    got.add_batch(torch.from_numpy(X), torch.from_numpy(G), mask)
    assert got.sequences == expected.sequences == int((mask.sum(1) > 0).sum())
    assert _relative_error(got.sum_xg, expected.sum_xg) < RTOL
    assert _relative_error(got.sum_xg_normalized, expected.sum_xg_normalized) < RTOL
    assert np.isfinite(got.sum_xg).all()


def test_float32_products_stay_close_and_sums_stay_float64() -> None:
    X, G, mask = _padded_batch(6, 32, 24, seed=1)
    expected = _reference(X, G, mask)
    got = GradientStats(24)
    got.add_batch(X, G, mask, precision="float32")  # numpy in, too
    assert got.sum_xg.dtype == np.float64
    assert _relative_error(got.sum_xg, expected.sum_xg) < 1e-5
    assert _relative_error(got.sum_xg_normalized, expected.sum_xg_normalized) < 1e-5


@pytest.mark.parametrize("mask", [None, "padded"])
def test_the_gradient_of_an_all_zero_activation_row_is_dropped(mask: str | None) -> None:
    """A zero row (a token whose residual stream is exactly zero) has no projection error whatever P, but
    meets RMSNorm at its 1/√eps derivative: on the tiny LM its gradient was 1e11 times the others' and, paired
    with the sequence's other rows by XᵀX GᵀG, decided nl-mse's P alone. It must weigh nothing (still M)."""
    X, G, padding = _padded_batch(6, 16, 8, seed=4)
    valid = padding if mask else None
    if not mask:
        X, G = np.nan_to_num(X), np.nan_to_num(G, posinf=0.0)
    clean = G.copy()
    X[0, 0] = 0.0
    G[0, 0] = 1e10
    clean[0, 0] = 0.0
    expected = _reference(X, clean, valid)
    batched = GradientStats(8)
    batched.add_batch(torch.from_numpy(X), torch.from_numpy(G), valid)
    for got in (batched, _reference(X, G, valid)):  # the batched form and GradientStats.add
        assert got.sequences == expected.sequences
        assert _relative_error(got.sum_xg, expected.sum_xg) < RTOL
        assert _relative_error(got.sum_xg_normalized, expected.sum_xg_normalized) < RTOL


def test_batches_merge_like_sequences() -> None:
    """Sums over two batches, merged (as the all-reduce does), equal one reference over all sequences."""
    X, G, mask = _padded_batch(6, 20, 10, seed=2)
    first, second = GradientStats(10), GradientStats(10)
    first.add_batch(X[:4], G[:4], mask[:4])
    second.add_batch(X[4:], G[4:], mask[4:])
    first.merge(second)
    expected = _reference(X, G, mask)
    assert first.sequences == expected.sequences
    assert _relative_error(first.C_XG, expected.C_XG) < RTOL
    assert _relative_error(first.C_XG_normalized, expected.C_XG_normalized) < RTOL


def test_layouts_the_interpreter_produces() -> None:
    """Rows flattened to [batch·seq, K] are split by the mask; without one, [batch, seq, K] splits per batch row."""
    X, G, mask = _padded_batch(6, 12, 5, seed=3)
    flat = GradientStats(5)
    _reduce_sequences(flat, torch.from_numpy(X.reshape(-1, 5)), torch.from_numpy(G.reshape(-1, 5)), mask)
    expected = _reference(X, G, mask)
    assert flat.sequences == expected.sequences
    assert _relative_error(flat.sum_xg, expected.sum_xg) < RTOL

    X, G = np.nan_to_num(X), np.nan_to_num(G, posinf=0.0)
    unmasked = GradientStats(5, normalized=False)
    _reduce_sequences(unmasked, torch.from_numpy(X), torch.from_numpy(G), None)
    expected = _reference(X, G, None, normalized=False)
    assert unmasked.sequences == 6
    assert _relative_error(unmasked.sum_xg, expected.sum_xg) < RTOL
    with pytest.raises(ValueError, match="normalized"):
        _ = unmasked.C_XG_normalized


def test_batch_statistic_returns_float64_on_the_input_device() -> None:
    X, G, mask = _padded_batch(6, 8, 4, seed=4)
    plain, normalized, sequences = batch_statistic(torch.from_numpy(X), torch.from_numpy(G), mask, normalized=True)
    assert plain.dtype == normalized.dtype == torch.float64
    assert plain.device == torch.from_numpy(X).device
    assert sequences == 5
    assert batch_statistic(X, G, mask)[1] is None


# ---- end to end on sample models -------------------------------------------------------------------


def _feeds(model: onnx.ModelProto, batches: int = 2, batch: int = 4, seq: int = 9) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(batches):
        ids = rng.integers(0, 256, size=(batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, seq - 3 :] = 0
        mask[2, 2:] = 0
        feeds.append(complete_feed({"input_ids": ids, "attention_mask": mask}, input_specs(model)))
    return feeds


def _reference_collection(
    model: onnx.ModelProto, targets: Sequence, batches: Sequence[dict[str, np.ndarray]]
) -> dict[str, GradientStats]:
    """The previous collection: the same forward and backward, then each sequence reduced in numpy."""
    from espace_export.calibration.gradients import _graph_forward, output_loss, resolve_loss
    from espace_export.calibration.onnx_torch import TorchGraph
    from espace_export.calibration.statistics import distinct_activations

    widths = {name: K for name, (K, _) in distinct_activations(targets).items()}
    stats = {name: GradientStats(K) for name, K in widths.items()}
    forward = _graph_forward(TorchGraph(model), set(widths))
    kind = resolve_loss(model, "auto")
    for index, feed in enumerate(batches):
        output, tracked = forward(feed)
        names = [n for n in widths if n in tracked]
        grads = torch.autograd.grad(output_loss(kind, output, feed, index), [tracked[n] for n in names])
        mask = feed["attention_mask"]
        for name, grad in zip(names, grads, strict=True):
            K = widths[name]
            X = tracked[name].detach().numpy().reshape(*mask.shape, K)
            G = grad.numpy().reshape(*mask.shape, K)
            for row in range(mask.shape[0]):
                valid = mask[row].astype(bool)
                stats[name].add(X[row][valid], G[row][valid])
    return stats


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_collected_statistics_equal_the_per_sequence_reference(sample_model, arch: str) -> None:
    model = onnx.load(sample_model(arch, "torchscript"))
    targets = find_targets(model)
    batches = _feeds(model)
    got = collect_gradient_statistics(model, targets, batches)
    expected = _reference_collection(model, targets, batches)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].sequences == expected[name].sequences == 8
        assert _relative_error(got[name].sum_xg, expected[name].sum_xg) < RTOL
        assert _relative_error(got[name].sum_xg_normalized, expected[name].sum_xg_normalized) < RTOL


def test_one_backward_pass_per_batch(sample_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    calls: list[int] = []
    grad = torch.autograd.grad

    def counting(outputs, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    stats = collect_gradient_statistics(model, targets, _feeds(model, batches=3))
    assert len(calls) == 3  # one backward per batch, to every tracked activation at once
    assert calls[0] == len(stats)


def test_calibration_forms_gradient_products_in_the_statistics_precision(sample_model) -> None:
    """``--stats-precision`` governs both statistics: float64 equals the exact reference, float32 (the
    default) stays within float32 round-off of it, and the sums are float64 either way."""
    from espace_export.calibration.collect import calibrate_model

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    batches = _feeds(model)
    expected = _reference_collection(model, targets, batches)
    exact = calibrate_model(model, targets, batches, methods=["nl-mse"], precision="float64").gradients
    fast = calibrate_model(model, targets, batches, methods=["nl-mse"]).gradients
    assert exact is not None and fast is not None
    for name in expected:
        assert exact[name].sum_xg.dtype == fast[name].sum_xg.dtype == np.float64
        assert _relative_error(exact[name].sum_xg, expected[name].sum_xg) < RTOL
        error = _relative_error(fast[name].sum_xg, expected[name].sum_xg)
        assert 0 < error < 1e-5
