"""The terminal layer table fits an 80-column terminal without folding a layer name."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from espace_export.io.reports import common_prefix, print_summary, short_names, to_markdown


def fake_report(names: list[str], *, K: int = 4096, N: int = 14336, candidate: str = "whitened-svd") -> dict[str, Any]:
    layers = [
        {"name": name, "K": K, "N": N, "L": 2048 if i % 3 else None, "candidate": candidate if i % 3 else None,
         "compression": 0.6406 if i % 3 else 0.0, "mse_relative": 0.12345 if i % 3 else None}
        for i, name in enumerate(names)
    ]  # fmt: skip
    return {
        "model": "m.onnx", "output": "m.espace.onnx", "ratio_requested": 0.5,
        "targeted_params_before": 123_456_789_012, "targeted_params_after": 61_728_394_506,
        "targeted_compression": 0.5, "total_params_before": 223_456_789_012, "total_params_after": 161_728_394_506,
        "total_compression": 0.276, "layers_compressed": 2, "layers_dense": 1,
        "calibration": {"source": "text (builtin:pydoc, tokenizer /a/rather/long/path/to/the/tokenizer)", "batches": 16},
        "selection": {"wins": {"go-mse-l2": 120, "whitened-svd": 40}}, "siblings": "separate",
        "fidelity": {"outputs": {"last_hidden_state": {"relative_l2": 0.12345, "cosine_mean": 0.98765,
                                                       "cosine_min": 0.91234}}},
        "layers": layers,
    }  # fmt: skip


LLAMA = [f"model.model.layers.{i}.{part}" for i in range(12) for part in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
MINILM = [f"encoder.layer.{i}.{part}" for i in range(6) for part in
          ("attention.self.query", "attention.self.key", "attention.output.dense", "intermediate.dense")]  # fmt: skip
TORCHSCRIPT = [f"/model/layers.{i}/self_attn/q_proj/MatMul" for i in range(3)]


def render(report: dict[str, Any], width: int = 80) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    print_summary(report, console, max_layers=100)
    return console.export_text().splitlines()


@pytest.mark.parametrize("names", [LLAMA, MINILM, TORCHSCRIPT], ids=["llama", "minilm", "slashes"])
def test_layer_table_fits_80_columns_and_never_folds_a_name(names: list[str]) -> None:
    lines = render(fake_report(names))
    assert max(len(line) for line in lines) <= 80
    prefix, shown = short_names(names)
    assert prefix and all(len(s) < len(n) for s, n in zip(shown, names, strict=True))
    rows = [line for line in lines if line.strip()]
    for short in shown:  # each shortened name whole, on one line, at the start of its row
        assert any(line.lstrip().startswith(short + " ") for line in rows), short
    caption = " ".join(lines)
    assert prefix in caption  # the prefix is said once, under the table


def test_full_names_stay_in_the_markdown_report() -> None:
    markdown = to_markdown(fake_report(LLAMA))
    assert all(f"`{name}`" in markdown for name in LLAMA)


def test_common_prefix_ends_at_a_separator_and_keeps_a_last_component() -> None:
    assert common_prefix(["model.layers.10.q", "model.layers.11.q"]) == "model.layers."
    assert common_prefix(["a.b.c"]) == ""
    assert common_prefix(["a.b.c", "a.b.c"]) == "a.b."
    assert common_prefix(["/m/l0/q/MatMul", "/m/l1/q/MatMul"]) == "/m/"
    assert common_prefix(["encoder.x", "decoder.x"]) == ""


def test_a_name_too_long_for_the_terminal_loses_its_middle_not_its_columns() -> None:
    names = [f"transformer.h.{i}.a_really_long_module_name.with_many_parts.attention.c_attn_projection" for i in (0, 1)]
    lines = render(fake_report(names))
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if "4096" in line]
    assert len(rows) == 2 and all("14336" in row and "…" in row for row in rows)
    assert rows[1].lstrip().startswith("1.a_") and "projection " in rows[1]


def test_each_compressed_layer_reports_its_relative_output_error(tmp_path) -> None:
    """``output_error_relative`` = E‖x(W − AB)‖² / E‖xW‖² of the applied factors on the calibration statistics,
    for every method (oblique too, where the projection-only ``mse_relative`` does not apply); shown in the table."""
    import io

    import numpy as np
    import onnx

    import espace_export
    from espace_export.io.artifacts import load_calibration, load_plan
    from graph_passes import find_targets
    from graph_passes.find import weight_matrix
    from tests._models import VOCAB, tiny_decoder

    model = tiny_decoder(blocks=2)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    ids = np.random.default_rng(0).integers(0, VOCAB, (16, 12))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = espace_export.compress(
        path, ratio=0.5, min_rank=4, rank_rule=4, method="oblique", select="none", calib_data=tmp_path / "calib.npz",
        batch_size=2, statistics=tmp_path / "s.npz", plan=tmp_path / "p.json", output=tmp_path / "c.onnx",
    )  # fmt: skip
    stats, plan = load_calibration(tmp_path / "s.npz").stats, load_plan(tmp_path / "p.json")
    targets = {t.name: t for t in find_targets(model)}
    layers = [layer for layer in result.report["layers"] if layer["L"] is not None]
    assert layers and all(layer["mse_relative"] is None for layer in layers)  # oblique: A is not orthonormal
    for layer in layers:
        W = weight_matrix(model, targets[layer["name"]]).astype(np.float64)
        C = stats[targets[layer["name"]].activation].C_X
        factors = plan.factors[layer["name"]]  # a plan file keeps A and M; B = M·W is folded at apply
        assert factors.B is None and factors.M is not None
        D = W - factors.A @ (factors.M @ W)
        expected = np.trace(D.T @ C @ D) / np.trace(W.T @ C @ W)
        assert 0 < expected < 1
        assert layer["output_error_relative"] == pytest.approx(expected, rel=1e-9)
    dense = [layer for layer in result.report["layers"] if layer["L"] is None]
    assert all(layer["output_error_relative"] is None for layer in dense)
    console = Console(file=io.StringIO(), width=80)
    print_summary(result.report, console)
    assert f"{layers[0]['output_error_relative']:.4f}" in console.file.getvalue()
