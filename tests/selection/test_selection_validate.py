"""Per-layer validation, progressive application, the inflection point."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import espace_export
from espace_export.selection.ranks import inflection_point, progressive_selection, rank_layers


def test_progressive_curve_is_monotone_in_compression_and_stops_at_the_ratio() -> None:
    order = ["a", "b", "c", "d"]
    saved = {"a": 10, "b": 30, "c": 20, "d": 40}
    losses = iter([1.1, 1.3, 1.2, 2.0])
    selected, curve = progressive_selection(
        order, saved, 100, 0.35, evaluate=lambda applied: next(losses), baseline=1.0
    )
    assert selected == ["a", "b"]  # 40 % ≥ 35 % after two layers
    compressions = [p["compression"] for p in curve]
    assert compressions == sorted(compressions) and len(set(compressions)) == len(compressions)
    assert compressions[-1] == pytest.approx(1.0) and curve[0]["loss"] == 1.0
    # the proxy path: cumulative estimates, no evaluation
    _, proxy = progressive_selection(order, saved, 100, 0.35, estimate={"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4})
    assert [p["loss"] for p in proxy] == pytest.approx([0.0, 0.1, 0.3, 0.6, 1.0])


def test_rank_layers_skips_harmful_ones_and_knee_sits_where_the_curve_bends() -> None:
    order, skipped = rank_layers({"x": 0.03, "y": 0.001, "z": 0.01}, max_layer_loss=0.02)
    assert order == ["y", "z"] and skipped == ["x"]
    curve = [{"compression": c, "loss": v} for c, v in [(0, 0), (0.2, 0.01), (0.4, 0.02), (0.6, 0.05), (0.8, 0.5)]]
    assert inflection_point(curve) == 3


def test_validator_scores_one_layer_as_the_rewritten_model_does(sample_model) -> None:
    from espace_export.io.data import complete_feed, input_specs
    from espace_export.projection.rewrite import apply_factorizations
    from espace_export.runtime import ort_session
    from espace_export.selection.factorizations import truncated_svd
    from espace_export.selection.validation import Validator, validation_loss
    from graph_passes import find_targets, weight_matrix

    path = sample_model("llama", "torchscript")
    model = onnx.load(path)
    targets = find_targets(model)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 256, (2, 12)).astype(np.int64)} for _ in range(2)]
    assert Validator(model, targets, batches[:1]).loss == "kl"  # the default for a causal LM
    validator = Validator(model, targets, batches, loss="next-token")
    assert validator.loss == "next-token" and validator.baseline > 0
    target = targets[4]
    f = truncated_svd(weight_matrix(model, target).astype(np.float64), 16)
    trial = validator.evaluate({target.name: validator.effective(target.name, f.weight())})
    rewritten = apply_factorizations(onnx.load(path), [(target, f)])
    session = ort_session(rewritten)
    total = count = 0
    for batch in batches:
        feed = complete_feed(batch, input_specs(model))
        value, n = validation_loss("next-token", session.run(None, feed)[0], feed, None)
        total, count = total + value, count + n
    assert trial == pytest.approx(total / count, rel=1e-5)
    assert trial != pytest.approx(validator.baseline, rel=1e-7)


def test_kl_validation_is_zero_for_the_original_and_matches_its_definition(sample_model) -> None:
    from espace_export.selection.factorizations import truncated_svd
    from espace_export.selection.validation import Validator
    from graph_passes import find_targets, weight_matrix

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (2, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # padding tokens are not scored
    validator = Validator(model, targets, [{"input_ids": ids, "attention_mask": mask}], loss="kl")
    assert validator.baseline == pytest.approx(0.0, abs=1e-12)
    target = targets[0]
    override = {target.name: validator.effective(target.name, truncated_svd(weight_matrix(model, target), 8).weight())}
    trial = validator.evaluate(override)
    feed = validator.feeds[0]
    p = _softmax(validator._run(feed, {}))
    q = _softmax(validator._run(feed, override))
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    assert trial == pytest.approx(kl[mask.astype(bool)].mean(), rel=1e-4) and trial > 0


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.mark.slow
def test_compress_with_validation_meets_the_ratio_and_records_every_score(sample_model, tmp_path) -> None:
    path = sample_model("bert", "torchscript")
    result = espace_export.compress(
        path, ratio=0.3, method="auto", select="validate", num_batches=6, seq_len=16, output=tmp_path / "m.onnx",
        max_layer_loss=0.5,
    )  # fmt: skip
    report = result.report
    assert report["selection"]["score"] == "validation loss (distill)"
    assert result.targeted_compression >= 0.3 - 1e-9
    scored = [layer for layer in report["layers"] if layer.get("scores")]
    assert scored and all(len(layer["scores"]) == 7 for layer in scored)
    # siblings share a projection by default: Q/K/V is one unit, scored once per method
    units = {layer["group"] or layer["name"] for layer in scored}
    assert len(units) < len(scored)
    passes = report["selection"]["validation"]["passes"]
    assert passes == 1 + 7 * len(units) + len(report["selection"]["curve"]) - 1
    wins = report["selection"]["wins"]  # how often each method won, over the compressed layers
    assert sum(wins.values()) == report["layers_compressed"]
    assert wins == _count(layer["method"] for layer in report["layers"] if layer["compressed"])
    assert "methods chosen" in result.report_path.with_suffix(".md").read_text()


def test_kl_selection_runs_on_an_lm_and_is_refused_on_an_encoder(sample_model, tmp_path) -> None:
    from espace_export.errors import EspaceError

    result = espace_export.compress(
        sample_model("llama", "torchscript"), ratio=0.3, method="best", select="validate", validation_loss="kl",
        num_batches=6, seq_len=16, output=tmp_path / "m.onnx",
    )  # fmt: skip
    assert result.report["selection"]["score"] == "validation loss (kl)"
    assert result.report["selection"]["baseline_loss"] == pytest.approx(0.0, abs=1e-9)
    assert all(layer["harm"] >= 0 for layer in result.report["layers"] if layer.get("harm") is not None)
    with pytest.raises(EspaceError, match="needs a causal LM"):
        espace_export.compress(
            sample_model("bert", "torchscript"), ratio=0.3, select="validate", validation_loss="kl",
            num_batches=6, seq_len=16, output=tmp_path / "b.onnx",
        )  # fmt: skip
