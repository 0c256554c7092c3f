"""The profiler: GEMM groups read from two models, GEMM graphs, interleaved timing, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from espace_export.deploy.build import BuildSettings
from espace_export.deploy.profile import (
    GemmGroup,
    ProfileSettings,
    distinct_groups,
    flop_ratio,
    gemm_graph,
    gemm_groups,
    gemm_weights,
    interleave,
    paired_ratios,
    profile,
    profile_gemms,
    require_torch_cuda,
    summarize,
    torch_gemm,
)
from espace_export.errors import EspaceError
from tests._cli import run_cli
from tests._models import HIDDEN, INTER, compress_tiny, tiny_decoder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("profile")
    original = tiny_decoder(blocks=2)
    paths = directory / "tiny.onnx", directory / "tiny.espace.onnx"
    onnx.save(original, str(paths[0]))
    onnx.save(compress_tiny(original), str(paths[1]))
    return paths


FAST = ProfileSettings(seq=16, warmup=1, repeats=3, build=BuildSettings(threads=1))


# ------------------------------------------------------------------------------------------- groups and FLOPs


def test_gemm_groups_follow_shared_projections_and_dense_layers() -> None:
    original = tiny_decoder(blocks=2)
    groups = gemm_groups(original, compress_tiny(original, rank=8))
    block0 = [g for g in groups if g.layers[0].startswith("model.layers.0.")]
    assert [(g.layers, g.K, g.Ns, g.L) for g in block0] == [
        (("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"), HIDDEN, (HIDDEN, HIDDEN), 8),
        (("model.layers.0.self_attn.k_proj",), HIDDEN, (HIDDEN,), None),  # left dense
        (("model.layers.0.self_attn.o_proj",), HIDDEN, (HIDDEN,), 8),
        (("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"), HIDDEN, (INTER, INTER), 8),
        (("model.layers.0.mlp.down_proj",), INTER, (HIDDEN,), 8),
    ]
    assert not any("lm_head" in name for g in groups for name in g.layers)  # an uncompressed head is not targeted
    shapes = distinct_groups(groups)
    assert len(shapes) == 5 and all(len(members) == 2 for _, members in shapes)


def test_flop_ratio_counts_a_shared_projection_once() -> None:
    qkv = GemmGroup(("q", "k", "v"), 4096, (4096, 4096, 4096), 1024)
    assert qkv.flops(2048, compressed=False) == 2 * 2048 * 4096 * 3 * 4096
    assert qkv.flops(2048, compressed=True) == 2 * 2048 * 1024 * (4096 + 3 * 4096)
    assert flop_ratio([qkv]) == pytest.approx(1 / 3)
    fc2 = GemmGroup(("down",), 11008, (4096,), 1024)
    dense = GemmGroup(("k",), 64, (64,), None)
    assert flop_ratio([fc2]) == pytest.approx(1024 * (11008 + 4096) / (11008 * 4096))
    assert flop_ratio([dense]) == 1.0
    total = (qkv.flops(1, compressed=True) + dense.flops(1, compressed=True)) / (
        qkv.flops(1, compressed=False) + dense.flops(1, compressed=False)
    )
    assert flop_ratio([qkv, dense]) == pytest.approx(total)


def test_gemm_groups_refuse_models_that_do_not_belong_together() -> None:
    original = tiny_decoder()
    compressed = compress_tiny(original)
    with pytest.raises(EspaceError, match="already holds"):
        gemm_groups(compressed, compressed)
    with pytest.raises(EspaceError, match="no ESPACE projected pairs"):
        gemm_groups(original, original)
    with pytest.raises(EspaceError, match="does not match ORIGINAL"):
        gemm_groups(tiny_decoder(hidden=16, inter=48), compressed)


# ------------------------------------------------------------------------------------------- GEMM graphs


def test_gemm_graphs_compute_the_dense_and_the_projected_products() -> None:
    group = GemmGroup(("a", "b"), 24, (16, 40), 8)
    weights = gemm_weights(group, 10, "float32", seed=2)
    X = weights["X"].astype(np.float64)
    for compressed in (False, True):
        model = gemm_graph(group, weights, compressed=compressed)
        onnx.checker.check_model(model)
        outputs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"X": weights["X"]}
        )
        if compressed:
            expected = [(X @ weights["P"]) @ b for b in weights["PtW"]]
            assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul", "MatMul"]  # X·P once, shared
        else:
            expected = [X @ w for w in weights["W"]]
        for got, want in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gemm_weights_have_the_layer_shapes_and_dtype() -> None:
    weights = gemm_weights(GemmGroup(("a",), 12, (20,), 4), 6, "float16")
    assert weights["X"].shape == (6, 12) and weights["X"].dtype == np.float16
    assert weights["W"][0].shape == (12, 20) and weights["P"].shape == (12, 4) and weights["PtW"][0].shape == (4, 20)
    assert "P" not in gemm_weights(GemmGroup(("a",), 12, (20,), None), 6)


def test_torch_path_computes_what_the_onnx_graphs_compute() -> None:
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'espace-export[torch]')")
    group = GemmGroup(("a", "b"), 16, (8, 24), 4)
    weights = gemm_weights(group, 5, "float32", seed=1)
    for compressed in (False, True):
        once, compute = torch_gemm(group, weights, compressed=compressed, device="cpu")
        model = gemm_graph(group, weights, compressed=compressed)
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"X": weights["X"]}
        )
        for got, want in zip(compute(), expected, strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
        assert once() > 0


def test_torch_cuda_without_a_gpu_says_why() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(EspaceError, match="needs a CUDA device"):
        require_torch_cuda()
    with pytest.raises(EspaceError, match="needs a CUDA device"):
        profile_gemms([GemmGroup(("a",), 8, (8,), 4)], ProfileSettings(backend="torch-cuda", seq=4))


@pytest.mark.gpu
def test_torch_cuda_fp16_gemm_timing() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the torch-cuda backend times GEMMs on a GPU")
    groups = [GemmGroup(("a",), 1024, (1024,), 256)]
    gemm = profile_gemms(groups, ProfileSettings(backend="torch-cuda", seq=512, warmup=2, repeats=5))
    assert gemm["dtype"] == "float16" and gemm["groups"][0]["original_ms"]["median"] > 0


# ------------------------------------------------------------------------------------------- timing


def test_interleave_warms_up_then_alternates_the_order() -> None:
    calls: list[str] = []

    def bench(name: str) -> object:
        def once() -> float:
            calls.append(name)
            return float(len(calls))

        return once

    times = interleave([bench("a"), bench("b")], warmup=2, repeats=4)  # type: ignore[list-item]
    assert calls == ["a", "b", "a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert times == [[5.0, 8.0, 9.0, 12.0], [6.0, 7.0, 10.0, 11.0]]


def test_summaries_report_median_and_quartiles_in_milliseconds() -> None:
    summary = summarize([0.001, 0.002, 0.003, 0.004, 0.100])
    assert (summary["median"], summary["p25"], summary["p75"], summary["n"]) == pytest.approx((3.0, 2.0, 4.0, 5))
    assert summary["max"] == pytest.approx(100.0)
    ratios = paired_ratios([1.0, 2.0, 4.0], [0.5, 1.5, 2.0])
    assert ratios["median"] == pytest.approx(0.5)


def test_settings_pick_dtypes_and_ttft_backend() -> None:
    assert ProfileSettings().resolved_gemm_dtype() == "float32"
    assert ProfileSettings(backend="torch-cuda").resolved_gemm_dtype() == "float16"
    assert ProfileSettings(backend="torch-cuda").resolved_ttft_backend() is None
    assert ProfileSettings(backend="torch-cuda", ttft_backend="ort-cuda").resolved_ttft_backend() == "ort-cuda"
    assert ProfileSettings(batch=2, seq=64).M == 128


# ------------------------------------------------------------------------------------------- whole profile


def test_profile_writes_a_consistent_report_with_markdown_and_chart(models: tuple[Path, Path], tmp_path: Path) -> None:
    result = profile(*models, FAST, output=tmp_path / "p.json")
    report = json.loads(result.paths["json"].read_text())
    assert report == json.loads(json.dumps(result.report))
    assert (report["kind"], report["backend"], report["ttft_backend"], report["M"]) == (
        "profile",
        "ort-cpu",
        "ort-cpu",
        16,
    )
    gemm, ttft = report["gemm"], report["ttft"]
    assert len(gemm["groups"]) == 5 and all(row["count"] == 2 for row in gemm["groups"])
    assert gemm["original_total_ms"] == pytest.approx(
        sum(r["count"] * r["original_ms"]["median"] for r in gemm["groups"])
    )
    assert gemm["ratio"] == pytest.approx(gemm["compressed_total_ms"] / gemm["original_total_ms"])
    dense = next(r for r in gemm["groups"] if r["L"] is None)
    assert dense["ratio"] == 1.0 and dense["flop_ratio"] == 1.0
    assert all(len(r["original_ms"]["samples"]) == FAST.repeats for r in gemm["groups"])
    assert ttft["ratio"] == pytest.approx(ttft["compressed_ms"]["median"] / ttft["original_ms"]["median"])
    share = gemm["original_total_ms"] / ttft["original_ms"]["median"]
    assert report["gemm_share"] == pytest.approx(share)
    assert report["amdahl_bound"] == pytest.approx(1 - share * (1 - report["flop_ratio"]))
    assert report["flop_ratio"] == pytest.approx(flop_ratio(gemm_groups(*(onnx.load(str(p)) for p in models))))
    markdown = result.paths["markdown"].read_text()
    assert "Amdahl bound" in markdown and "| **total**" in markdown
    assert result.paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_without_ttft_and_its_errors(models: tuple[Path, Path], tmp_path: Path) -> None:
    settings = ProfileSettings(seq=8, warmup=0, repeats=1, ttft=False)
    report = profile(*models, settings, output=tmp_path / "g.json").report
    assert "ttft" not in report and "amdahl_bound" not in report and "gemm" in report
    with pytest.raises(EspaceError, match="nothing to profile"):
        profile(*models, ProfileSettings(gemm=False, ttft=False), output=tmp_path / "x.json")
    with pytest.raises(EspaceError, match="not found"):
        profile(tmp_path / "missing.onnx", models[1], settings, output=tmp_path / "x.json")
    with pytest.raises(EspaceError, match="already holds"):
        profile(models[1], models[0], settings, output=tmp_path / "x.json")


def test_profile_command_prints_json(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["profile", *map(str, models), "--seq", "8", "--warmup", "0", "--repeats", "2", "--threads", "1"]
    code, out, _ = run_cli([*args, "-o", str(tmp_path / "cli.json"), "--json"], capsys)
    assert code == 0 and json.loads(out)["repeats"] == 2
    assert (tmp_path / "cli.md").is_file() and (tmp_path / "cli.png").is_file()
    code, _, err = run_cli([*args, "--backend", "nope"], capsys)
    assert code == 2 and "nope" in err


def test_profile_command_adds_rounds_until_the_target_interval(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["profile", *map(str, models), "--seq", "8", "--warmup", "0", "--repeats", "2", "--threads", "1"]
    args += ["--no-gemm", "-o", str(tmp_path / "tight.json"), "--json"]
    code, out, _ = run_cli([*args, "--target-interval", "1e-9", "--max-repeats", "6"], capsys)
    report = json.loads(out)  # ± 1e-9 is never reached: the rounds stop at --max-repeats
    assert code == 0 and report["target_interval"] == 1e-9 and report["ttft"]["rounds"] == 6
    code, out, _ = run_cli(args, capsys)  # without a target: exactly --repeats rounds
    assert code == 0 and json.loads(out)["ttft"]["rounds"] == 2 and json.loads(out)["target_interval"] is None
    code, _, err = run_cli([*args, "--target-interval", "0.02", "--max-repeats", "1"], capsys)
    assert code == 2 and "--max-repeats must lie between --repeats (2)" in err
    code, _, err = run_cli([*args, "--target-interval", "1.5"], capsys)
    assert code == 2 and "--target-interval must be a fraction" in err
