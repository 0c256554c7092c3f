"""Plans and calibration statistics as artifacts: round trips, and rejection on the wrong model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import espace_export
from espace_export.errors import EspaceError
from espace_export.io.artifacts import check_fingerprint, fingerprint, load_calibration, load_plan, save_plan


@pytest.fixture(scope="module")
def planned(sample_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    path = sample_model("llama", "torchscript")
    result = espace_export.compress(
        path, ratio=0.3, method="best", select="proxy", num_batches=4, seq_len=16, output=out / "m.onnx",
        plan_path=out / "plan.json", statistics=out / "stats.npz", curve_path=out / "curve",
    )  # fmt: skip
    return path, out, result


def test_plan_round_trips(planned, tmp_path) -> None:
    _, out, _ = planned
    plan = load_plan(out / "plan.json")
    assert plan.select == "proxy" and len(plan.methods) == 6
    assert plan.factors and all(layer.name in plan.factors for layer in plan.selected_layers())
    again = save_plan(plan, tmp_path / "again.json")
    reloaded = load_plan(again)
    assert reloaded.as_json() == plan.as_json()
    for name, f in plan.factors.items():
        np.testing.assert_array_equal(reloaded.factors[name].A, f.A)
        assert f.B is None and reloaded.factors[name].B is None  # ESPACE: B = PᵀW is folded at apply
    assert json.loads((out / "curve.json").read_text())["curve"][0]["compression"] == 0.0
    assert (out / "curve.png").stat().st_size > 1000


def test_a_plan_applied_from_its_files_writes_the_one_shot_model(planned, tmp_path) -> None:
    path, out, _ = planned
    with np.load(out / "plan.npz") as arrays:
        assert arrays.files and not [k for k in arrays.files if k.startswith("B.")]  # plans hold P, not PᵀW
    espace_export.apply(path, out / "plan.json", num_batches=4, seq_len=16, output=tmp_path / "m.onnx")
    one_shot = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out / "m.onnx").graph.initializer}
    applied = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert one_shot.keys() == applied.keys()
    for name, value in one_shot.items():
        np.testing.assert_allclose(applied[name], value, rtol=1e-6, atol=1e-7)


def test_statistics_round_trip_with_gradients(sample_model, tmp_path) -> None:
    from espace_export.calibration.collect import calibrate_model
    from espace_export.io.artifacts import save_calibration
    from espace_export.io.data import input_specs, random_token_batches
    from graph_passes import find_targets

    model = onnx.load(sample_model("llama", "torchscript"))
    targets = find_targets(model)
    with pytest.warns(UserWarning):
        batches = random_token_batches(input_specs(model), 256, batch_size=2, seq_len=8, num_batches=2, seed=0)
    calibration = calibrate_model(model, targets, batches, methods=["nl-mse-l2"])
    assert calibration.gradients is not None
    loaded = load_calibration(save_calibration(calibration, tmp_path / "stats.npz"))
    assert loaded.fingerprint == calibration.fingerprint
    for name, stats in calibration.stats.items():
        np.testing.assert_array_equal(loaded.stats[name].sum_xx_normalized, stats.sum_xx_normalized)
        np.testing.assert_array_equal(loaded.gradients[name].sum_xg, calibration.gradients[name].sum_xg)
        assert loaded.gradients[name].sequences == calibration.gradients[name].sequences == 4


def test_a_plan_for_other_weights_is_rejected(planned, sample_model) -> None:
    path, out, _ = planned
    plan = load_plan(out / "plan.json")
    from graph_passes import find_targets

    other = onnx.load(sample_model("llama", "torchscript", seed=1))  # same shapes, other weights
    with pytest.raises(EspaceError, match="weights of .* differ"):
        check_fingerprint(plan.fingerprint, fingerprint(other, find_targets(other)), "plan")
    wider = onnx.load(sample_model("gpt2", "torchscript"))
    with pytest.raises(EspaceError, match="does not have"):
        check_fingerprint(plan.fingerprint, fingerprint(wider, find_targets(wider)), "plan")


def test_bad_plan_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(EspaceError, match="not found"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(EspaceError, match="not an espace-export plan"):
        load_plan(tmp_path / "p.json")


def _exit_code(args: list[str]) -> int:
    from espace_export.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


def test_calibrate_plan_apply_commands_chain(sample_model, tmp_path, capsys) -> None:
    model = str(sample_model("llama", "torchscript"))
    common = ["--num-batches", "6", "--seq-len", "16", "-q"]
    stats, plan = str(tmp_path / "s.npz"), str(tmp_path / "p.json")
    with pytest.warns(UserWarning):
        assert _exit_code(["calibrate", model, "-o", stats, "--method", "auto", *common]) == 0
        plan_args = ["--method", "auto", "--select", "proxy", "--ratio", "0.3"]
        assert _exit_code(["plan", model, "--statistics", stats, "-o", plan, *plan_args, *common]) == 0
        assert _exit_code(["apply", model, "--plan", plan, "-o", str(tmp_path / "m.onnx"), *common]) == 0
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["select"] == "proxy" and report["targeted_compression"] >= 0.3
    assert _exit_code(["apply", str(sample_model("gpt2", "torchscript")), "--plan", plan, "-q"]) == 2
    assert "which this model does not have" in capsys.readouterr().err


def test_statistics_cover_every_layer_whatever_the_ratio(sample_model, tmp_path, capsys) -> None:
    from graph_passes import find_targets

    model = str(sample_model("llama", "torchscript"))
    common = ["--num-batches", "4", "--seq-len", "16", "-q"]
    stats = str(tmp_path / "s.npz")
    with pytest.warns(UserWarning):
        assert _exit_code(["calibrate", model, "-o", stats, "--ratio", "0.7", "--min-rank", "8", *common]) == 0
    activations = {t.activation for t in find_targets(onnx.load(model))}
    assert set(load_calibration(stats).stats) == activations  # not only the layers compressible at 0.7
    plan = str(tmp_path / "p.json")
    # the plan stage reads no batches unless it validates, so no random-ids warning here (it used to load
    # calibration batches it never used, through the compress command it re-invoked)
    args = ["--ratio", "0.3", "--siblings", "shared", *common]
    assert _exit_code(["plan", model, "--statistics", stats, "-o", plan, *args]) == 0
    assert load_plan(plan).selected_layers()

    partial = str(tmp_path / "partial.npz")
    with pytest.warns(UserWarning):
        assert _exit_code(["calibrate", model, "-o", partial, "--exclude", "mlp", *common]) == 0
        assert _exit_code(["plan", model, "--statistics", partial, "-o", plan, *common]) == 2
    assert "has no statistics for the input of" in capsys.readouterr().err
