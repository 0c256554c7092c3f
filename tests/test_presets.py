"""Presets: the default run is the recommended path (``auto`` scored by ``fisher``), ``--fast`` the cheap one
(``mse``, no selection); explicit ``--method``/``--select`` override a preset, and runs where the recommended
path cannot run or means nothing (``--max-memory``, random calibration ids) fall back to the fast one and
say so. Every report (JSON, Markdown, the terminal summary) names the settings it used."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from espace_export.options import CompressOptions
from espace_export.selection.factorizations import AUTO_METHODS
from tests._cli import run_cli
from tests._models import tiny_decoder

SMALL = ["--min-rank", "4", "--batch-size", "2", "--num-batches", "8", "--seq-len", "9"]


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """A two-block decoder and calibration ids for it (16 sequences of 9 tokens, right-padded)."""
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_decoder(blocks=2, hidden=64, inter=128, vocab=50), model)
    rng = np.random.default_rng(3)
    mask = np.ones((16, 9), dtype=np.int64)
    mask[::3, 6:] = 0
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 50, (16, 9)), attention_mask=mask)
    return model, tmp_path / "calib.npz"


def compress_cli(model: Path, data: Path, out: Path, extra: list[str], capsys: pytest.CaptureFixture[str]):
    code, stdout, err = run_cli([str(model), "--calib-data", str(data), "-o", str(out), *SMALL, *extra], capsys)
    assert code == 0, err
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    markdown = out.with_name(out.stem + ".report.md").read_text()
    return report, markdown, stdout, err


def test_default_run_is_the_recommended_preset(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = model_and_data
    report, markdown, stdout, stderr = compress_cli(model, data, tmp_path / "default.onnx", [], capsys)
    assert report["settings"] == {"preset": "recommended", "method": "auto", "select": "fisher"}
    assert report["select"] == "fisher" and report["selection"]["methods"] == list(AUTO_METHODS)
    # scored from one gradient pass over the validation batches: no validation pass, not the proxy
    assert report["selection"]["fisher"]["tokens"] > 0 and "validation" not in report["selection"]
    assert "| settings | recommended (auto, fisher) |" in markdown
    assert "recommended (auto, fisher)" in stdout and "note:" not in stderr


def test_fast_is_the_old_cheap_path(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fast`` is exactly ``--method mse --select none``: same ranks, same held-out fidelity."""
    model, data = model_and_data
    fast, markdown, stdout, _ = compress_cli(model, data, tmp_path / "fast.onnx", ["--fast"], capsys)
    explicit, _, _, _ = compress_cli(model, data, tmp_path / "explicit.onnx", ["--method", "mse", "--select", "none"],
                                  capsys)  # fmt: skip
    assert fast["settings"] == {"preset": "fast", "method": "mse", "select": "none"}
    assert explicit["settings"] == {"preset": "custom", "method": "mse", "select": "none"}
    assert "selection" not in fast
    assert {layer["candidate"] for layer in fast["layers"] if layer["compressed"]} == {"mse"}
    assert [layer["L"] for layer in fast["layers"]] == [layer["L"] for layer in explicit["layers"]]
    assert fast["fidelity"]["outputs"] == explicit["fidelity"]["outputs"]
    assert "| settings | fast (mse, none) |" in markdown and "fast (mse, none)" in stdout


def test_explicit_selection_overrides_the_preset(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = model_and_data
    report, _, stdout, _ = compress_cli(model, data, tmp_path / "proxy.onnx", ["--fast", "--select", "proxy"], capsys)
    assert report["settings"] == {"preset": "custom", "method": "mse", "select": "proxy"}
    assert report["select"] == "proxy" and report["selection"]["methods"] == ["mse"]
    assert "custom (mse, proxy)" in stdout


@pytest.mark.parametrize(
    ("settings", "method", "select"),
    [
        ({}, "auto", "fisher"),
        ({"fast": True}, "mse", "none"),
        ({"method": "nmse"}, "nmse", "fisher"),  # the preset fills only what is not given
        ({"candidate": "go-mse"}, "go-mse", "fisher"),
        ({"select": "proxy"}, "auto", "proxy"),
        ({"select": "none"}, "mse", "none"),  # a selection of none takes the single --candidate
        ({"select": "none", "candidate": "nmse"}, "nmse", "none"),
        ({"fast": True, "method": "best", "select": "validate"}, "best", "validate"),
    ],
)
def test_preset_fills_what_is_not_given(settings: dict[str, object], method: str, select: str) -> None:
    selection = CompressOptions.from_settings(calib_text="builtin:pydoc", **settings).selection
    assert (selection.method_name, selection.select) == (method, select)
    expected = "recommended" if not settings else "fast" if settings == {"fast": True} else "custom"
    assert selection.summary() == {"preset": expected, "method": method, "select": select}


def test_random_ids_fall_back_to_fast_and_say_why() -> None:
    """Without calibration data, selection would score random ids: the default is the fast path, with a note."""
    summary = CompressOptions.from_settings().selection.summary()
    assert (summary["preset"], summary["method"], summary["select"]) == ("fast", "mse", "none")
    assert "random calibration ids" in summary["note"]
    explicit = CompressOptions.from_settings(method="nmse", select="proxy").selection.summary()
    assert explicit == {"preset": "custom", "method": "nmse", "select": "proxy"}  # nothing fell back: no note
    # settings carried over from a base follow the data given later
    base = CompressOptions.from_settings()
    assert CompressOptions.from_settings(base, calib_text="builtin:pydoc").selection.preset == "recommended"


def test_max_memory_falls_back_to_fast_in_one_line(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = model_and_data
    report, markdown, stdout, stderr = compress_cli(model, data, tmp_path / "bounded.onnx", ["--max-memory", "1G"],
                                                    capsys)  # fmt: skip
    assert (report["settings"]["preset"], report["settings"]["method"], report["settings"]["select"]) == (
        "fast", "mse", "none"
    )  # fmt: skip
    assert report["calibration"]["max_memory"] == "1G" and report["layers_compressed"] > 0
    notes = [line for line in stderr.splitlines() if "--max-memory" in line]
    assert notes == ["note: fast (mse, none): --max-memory compresses group by group, which takes the fast settings"]
    assert "--max-memory" not in stdout and "fast (mse, none)" in stdout  # the table's row, without the note
    assert "| settings | fast (mse, none): --max-memory compresses group by group" in markdown
    # chosen explicitly, the recommended selection is still refused under --max-memory, in one line
    out = tmp_path / "refused.onnx"
    code, _, err = run_cli(
        [str(model), "--calib-data", str(data), "-o", str(out), *SMALL, "--max-memory", "1G", "--select", "validate"],
        capsys,
    )
    assert code == 2 and err.startswith("error: --max-memory") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_staged_report_names_the_plans_settings(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``apply`` reports the settings the plan was made with, not its own (unset) selection flags."""
    model, data = model_and_data
    source = [str(model), "--calib-data", str(data), *SMALL]
    stats, plan, out = tmp_path / "stats.npz", tmp_path / "plan.json", tmp_path / "applied.onnx"
    assert run_cli(["calibrate", *source, "--fast", "-o", str(stats)], capsys)[0] == 0
    assert run_cli(["plan", *source, "--fast", "--select", "proxy", "--statistics", str(stats), "-o", str(plan)],
                   capsys)[0] == 0  # fmt: skip
    code, _, err = run_cli(["apply", *source, "--plan", str(plan), "-o", str(out), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out.with_name("applied.report.json").read_text())
    assert report["settings"] == {"preset": "custom", "method": "mse", "select": "proxy"}


def test_select_fisher_scores_on_the_held_out_validation_batches(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``--select fisher`` plans from one gradient pass over the validation batches (none of the calibration
    ones: scored in-sample, a factorisation looks as good as its fit), with no validation pass, reaches the
    ratio, and writes a model ONNX Runtime runs."""
    pytest.importorskip("torch")
    import onnxruntime as ort

    import espace_export.harm
    from espace_export.pipeline import Run

    read: list[list[dict[str, np.ndarray]]] = []
    collect = espace_export.harm.collect_fisher_samples
    monkeypatch.setattr(
        espace_export.harm, "collect_fisher_samples", lambda m, t, batches, *a, **k: read.append(batches) or collect(m, t, batches, *a, **k)
    )  # fmt: skip
    model, data = model_and_data
    extra = ["--method", "best", "--select", "fisher", "--ratio", "0.3", "--plan", str(tmp_path / "p.json")]
    report, markdown, _, _ = compress_cli(model, data, tmp_path / "f.onnx", extra, capsys)
    assert report["select"] == "fisher" and report["targeted_compression"] >= 0.3
    assert report["settings"] == {"preset": "custom", "method": "best", "select": "fisher"}
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["score_kind"].startswith("Fisher estimate") and "validation" not in plan["info"]
    scored = [layer for layer in plan["layers"] if layer["scores"]]
    assert scored and all(layer["harm"] > 0 for layer in scored)
    assert len({layer["order"] for layer in scored}) > 1  # ranked by the score
    options = CompressOptions.from_settings(calib_data=data, min_rank=4, batch_size=2, num_batches=8, seq_len=9,
                                            method="best", select="fisher")  # fmt: skip
    batches = Run(model, options).batches
    assert len(read) == 1 and len(read[0]) == len(batches.validation) > 0
    for seen, held_out in zip(read[0], batches.validation, strict=True):
        np.testing.assert_array_equal(seen["input_ids"], held_out["input_ids"])
    calibration = {b["input_ids"].tobytes() for b in batches.calibration}
    assert not any(b["input_ids"].tobytes() in calibration for b in read[0])
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, dict(batches.validation[0]))[0]).all()


def test_recommended_without_torch_leaves_out_the_gradient_candidates(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A core install (no torch) still runs the recommended path: auto without nl-mse, said in one line."""
    import espace_export.options

    monkeypatch.setattr(espace_export.options, "torch_installed", lambda: False)
    model, data = model_and_data
    report, _, _, stderr = compress_cli(model, data, tmp_path / "core.onnx", [], capsys)
    forward = [m for m in AUTO_METHODS if not m.startswith("nl-")]
    assert report["selection"]["methods"] == forward and report["select"] == "validate"  # fisher needs torch
    assert (
        report["settings"]["preset"] == "recommended" and "leaves out nl-mse, nl-mse-l2" in report["settings"]["note"]
    )
    assert report["settings"]["note"].endswith("and layers are scored by validate, not fisher")
    assert len([line for line in stderr.splitlines() if line.startswith("note:")]) == 1
    # asked for explicitly, auto keeps every candidate (and needs torch, with its one-line error if absent)
    selection = CompressOptions.from_settings(calib_text="builtin:pydoc", method="auto").selection
    assert selection.methods == list(AUTO_METHODS) and "leaves out" not in selection.summary()["note"]
    assert selection.summary()["note"] == "torch is not installed, so layers are scored by validate, not fisher"
    explicit = CompressOptions.from_settings(calib_text="builtin:pydoc", method="auto", select="validate").selection
    assert "note" not in explicit.summary()


def test_recommended_on_a_graph_without_gradients_leaves_out_the_gradient_candidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A graph holding an operator the gradient pass cannot evaluate (onnxruntime-genai's GroupQueryAttention is
    the common one; ``Celu`` here) still runs the default path, without the nl-mse candidates, said in one
    ``note:`` line; asked for explicitly, ``--method nl-mse`` is refused in one line naming the operator."""
    pytest.importorskip("torch")
    model = tiny_decoder(blocks=2, hidden=64, inter=128, vocab=50)
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.output[0], relu_out = relu.output[0] + ".pre", relu.output[0]
    model.graph.node.insert(
        list(model.graph.node).index(relu) + 1,
        onnx.helper.make_node("Celu", [relu.output[0]], [relu_out], name="/celu"),
    )
    path = tmp_path / "celu.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 50, (16, 9)))
    report, _, _, stderr = compress_cli(path, tmp_path / "calib.npz", tmp_path / "out.onnx", [], capsys)
    assert report["selection"]["methods"] == [m for m in AUTO_METHODS if not m.startswith("nl-")]
    assert report["settings"]["preset"] == "recommended"
    assert "cannot evaluate Celu, so auto leaves out nl-mse, nl-mse-l2" in report["settings"]["note"]
    assert report["select"] == "validate" and "scored by validate, not fisher" in report["settings"]["note"]
    assert len([line for line in stderr.splitlines() if line.startswith("note:")]) == 1
    code, _, err = run_cli(
        [str(path), "--calib-data", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "x.onnx"), *SMALL,
         "--method", "nl-mse", "--select", "none"], capsys,
    )  # fmt: skip
    assert code == 2 and "Celu" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x.*"))
    code, _, err = run_cli(
        [str(path), "--calib-data", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "x.onnx"), *SMALL,
         "--method", "mse", "--select", "fisher"], capsys,
    )  # fmt: skip
    assert code == 2 and "--select fisher needs the model's gradients" in err and "Celu" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("x.*"))


def test_fill_lands_the_plan_at_the_ratio_with_higher_ranks_for_harmful_units(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fill``: the selected units' saving beyond --ratio goes back as higher ranks (one --rank-rule step at a
    time), the plan still at or above the ratio; the raised layers' factors are refitted at their new rank (as
    a plan asked for at that rank would fit them) and the model runs in ONNX Runtime. Refused, in one line and
    writing nothing, where no selection at the ratio runs."""
    import onnxruntime as ort

    from espace_export.io.artifacts import load_plan

    model, data = model_and_data
    common = ["--select", "proxy", "--method", "best", "--ratio", "0.3", "--rank-rule", "4"]
    plain, _, _, _ = compress_cli(model, data, tmp_path / "plain.onnx",
                                  [*common, "--no-fill", "--plan", str(tmp_path / "a.json")], capsys)  # fmt: skip
    assert "filled" not in plain["selection"]
    filled, markdown, _, _ = compress_cli(model, data, tmp_path / "filled.onnx",
                                          [*common, "--fill", "--plan", str(tmp_path / "b.json")], capsys)  # fmt: skip
    assert 0.3 - 1e-12 <= filled["targeted_compression"] < plain["targeted_compression"]
    raised = filled["selection"]["filled"]
    assert raised and all(new > old for old, new in raised.values())
    assert f"ranks raised on {len(raised)} unit" in markdown
    before, after = ({layer["name"]: layer for layer in report["layers"]} for report in (plain, filled))
    assert all(after[name]["L"] == new for name, (_, new) in raised.items())
    assert [name for name in after if after[name]["compressed"]] == [n for n in before if before[n]["compressed"]]
    plan_a, plan_b = load_plan(tmp_path / "a.json"), load_plan(tmp_path / "b.json")
    for name, (_, new) in raised.items():
        assert plan_b.factors[name].A.shape[1] == new
        assert after[name]["output_error_relative"] < before[name]["output_error_relative"]  # fits better
        assert plan_b.layer(name).harm < plan_a.layer(name).harm  # the harm is rescored at the new rank
    for name in set(before) - set(raised):
        assert plan_b.layer(name).harm == plan_a.layer(name).harm
    ort.InferenceSession(str(tmp_path / "filled.onnx"))
    default, _, _, _ = compress_cli(model, data, tmp_path / "default.onnx", common, capsys)  # on by default
    assert default["selection"]["filled"] == raised
    assert default["targeted_compression"] == pytest.approx(filled["targeted_compression"], abs=1e-12)
    for flag, extra in (("--fill", ["--select", "none"]), ("--rebalance", ["--select", "proxy", "--stop", "knee"])):
        out = tmp_path / "refused.onnx"
        code, _, err = run_cli([str(model), "--calib-data", str(data), "-o", str(out), *SMALL, flag, *extra],
                               capsys)  # fmt: skip
        assert code == 2 and flag in err and len(err.strip().splitlines()) == 1 and not out.exists()
    moved, markdown, _, _ = compress_cli(model, data, tmp_path / "moved.onnx", [*common, "--rebalance"], capsys)
    assert moved["targeted_compression"] >= 0.3 - 1e-12 and moved["selection"]["rebalanced"]
    assert f"ranks moved on {len(moved['selection']['rebalanced'])} unit" in markdown
    ort.InferenceSession(str(tmp_path / "moved.onnx"))


def test_fisher_samples_stay_within_the_available_memory(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """``--select fisher`` keeps X and G rows per validation token: it samples only the tokens whose rows fit
    three quarters of the memory available, says so in one notice and in the plan, and still writes a working
    model."""
    import onnxruntime as ort

    import espace_export.memory
    from espace_export.pipeline import fisher_token_budget
    from graph_passes import find_targets

    model, data = model_and_data
    targets = find_targets(onnx.load(model))
    per_token = 8 * (sum({t.activation: t.K for t in targets}.values()) + 2 * sum(t.N for t in targets))
    assert fisher_token_budget(targets, 2, 1000 * per_token) == 750
    assert fisher_token_budget(targets, 2, 0) == 1  # the first batch is always sampled
    extra = ["--method", "mse", "--select", "fisher", "--plan", str(tmp_path / "all.json")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no notice when every sequence fits
        whole, _, _, _ = compress_cli(model, data, tmp_path / "all.onnx", extra, capsys)
    assert "memory_bound" not in whole["selection"]["fisher"]
    monkeypatch.setattr(espace_export.memory, "available_memory", lambda: 1)
    extra = ["--method", "mse", "--select", "fisher", "--plan", str(tmp_path / "bound.json")]
    with pytest.warns(UserWarning, match=r"--select fisher sampled 2 of the \d+ validation .* smaller --holdout"):
        bound, _, _, _ = compress_cli(model, data, tmp_path / "bound.onnx", extra, capsys)
    fisher = bound["selection"]["fisher"]
    assert fisher["memory_bound"] and fisher["sequences"] == 2 < whole["selection"]["fisher"]["sequences"]
    assert fisher["tokens"] < whole["selection"]["fisher"]["tokens"]
    ort.InferenceSession(str(tmp_path / "bound.onnx"))
