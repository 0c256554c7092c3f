"""Bounded-memory calibration and streaming compression (espace_export.calibration groups, espace_export.streaming)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import espace_export.calibration.statistics as calibration
from espace_export.calibration.statistics import (
    MemoryBudget,
    PackedActivationStats,
    StatisticsSettings,
    collect_statistics,
    collect_statistics_in_groups,
    dense_statistics_bytes,
    distinct_activations,
    pack_add,
    packed_size,
    plan_groups,
    statistics_bytes,
    unpack,
)
from espace_export.errors import EspaceError
from espace_export.memory import parse_memory
from espace_export.options import RankOptions
from espace_export.runtime import ort_session
from espace_export.streaming import StreamingSettings, compress_streaming
from graph_passes import find_targets
from graph_passes.find import find_projected_pairs
from tests._models import tiny_decoder


def token_batches(vocab: int, count: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        mask = np.ones((2, 9), dtype=np.int64)
        mask[0, 6:] = 0  # right padding: left out of the statistics on both paths
        batches.append({"input_ids": rng.integers(0, vocab, (2, 9)).astype(np.int64), "attention_mask": mask})
    return batches


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_same_statistics(grouped: dict[str, PackedActivationStats], reference: dict, tol: float = 1e-10) -> None:
    assert set(grouped) == set(reference)
    for name, ref in reference.items():
        got = grouped[name]
        assert (got.rows, got.rows_normalized) == (ref.rows, ref.rows_normalized)
        assert relative_gap(got.sum_xx, ref.sum_xx) <= tol
        assert relative_gap(got.sum_xx_normalized, ref.sum_xx_normalized) <= tol


def collect_all(model: onnx.ModelProto, batches: list, budget: int, precision: str) -> tuple[dict, object]:
    received: dict[str, PackedActivationStats] = {}

    def consume(stats: dict[str, PackedActivationStats]) -> None:
        assert not set(stats) & set(received), "an activation was handed over twice"
        received.update(stats)

    settings = StatisticsSettings(precision=precision)  # type: ignore[arg-type]
    info = collect_statistics_in_groups(
        ort_session, model, find_targets(model), batches, MemoryBudget(budget), consume, settings
    )
    return received, info


@pytest.mark.parametrize("K", [1, 7, 600, 1100])
def test_packed_triangle_round_trips_and_symmetrises(K: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "PACK_BLOCK", 256)  # several row blocks, the last one partial
    rng = np.random.default_rng(K)
    A, B = rng.standard_normal((K, K)), rng.standard_normal((K, K)).astype(np.float32)
    packed = np.zeros(packed_size(K))
    pack_add(packed, A)
    pack_add(packed, B)
    B64 = B.astype(np.float64)
    np.testing.assert_array_equal(unpack(packed, K), (A + A.T) / 2 + (B64 + B64.T) / 2)
    upper_only = np.zeros(packed_size(K))
    pack_add(upper_only, np.triu(A), symmetrize=False)
    np.testing.assert_array_equal(unpack(upper_only, K), np.triu(A) + np.triu(A, 1).T)


@pytest.mark.parametrize("reduce", ["graph", "host"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_grouped_statistics_equal_the_one_session_path(
    reduce: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_decoder(blocks=3, hidden=32, inter=48)
    batches = token_batches(40)
    settings = StatisticsSettings(precision=precision, reduce=reduce)  # type: ignore[arg-type]
    reference = collect_statistics(ort_session, model, find_targets(model), batches, settings)
    if reduce == "host":  # the grouped path reduces on the host when the graph cannot (old opsets)
        monkeypatch.setattr(calibration, "MIN_OPSET", 10**6)
    one_group = statistics_bytes(48, normalized=True, precision=precision) + 8 * 48 * 48  # type: ignore[arg-type]
    grouped, info = collect_all(model, batches, one_group, precision=precision)
    assert len(info.groups) >= 6  # one or two activations per group: a dozen stages
    assert_same_statistics(grouped, reference)
    # every node leading to an activation runs once over all stages; the LM head never runs
    assert sum(info.stage_nodes) < len(model.graph.node)


def test_grouped_statistics_on_an_exported_sample(sample_model: Callable[..., Path]) -> None:
    from samples.make_models import sample_inputs

    model = onnx.load(str(sample_model("llama", "torchscript")))
    targets = find_targets(model)
    batches = [sample_inputs("llama", 2, 10, seed=s) for s in range(2)]
    reference = collect_statistics(ort_session, model, targets, batches, StatisticsSettings(precision="float64"))
    widths = [K for K, _ in distinct_activations(targets).values()]
    per_block = (
        sum(statistics_bytes(K, normalized=True, precision="float64") for K in widths[:4]) + 8 * max(widths) ** 2
    )
    grouped, info = collect_all(model, batches, per_block, precision="float64")
    assert len(info.groups) > 1
    assert_same_statistics(grouped, reference)


def test_live_statistics_stay_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts the packed sums alive at any moment (allocation to garbage collection), not RSS: holding all
    the statistics at once, as the one-session path does, would exceed the budget and fail here."""
    live = {"now": 0, "peak": 0}
    original_init = PackedActivationStats.__init__

    def counting_init(self: PackedActivationStats, K: int, normalized: bool = True) -> None:
        original_init(self, K, normalized)
        size = self.nbytes
        live["now"] += size
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(self, lambda: live.__setitem__("now", live["now"] - size))

    monkeypatch.setattr(PackedActivationStats, "__init__", counting_init)
    model = tiny_decoder(blocks=4, hidden=32, inter=48)
    targets = find_targets(model)
    widths = [K for K, _ in distinct_activations(targets).values()]
    all_packed = sum(8 * packed_size(K) for K in widths)
    all_dense = sum(dense_statistics_bytes(K, normalized=False) for K in widths)
    one_block = sum(statistics_bytes(K, normalized=False) for K in widths[:4]) + 8 * 48 * 48
    assert one_block < all_packed < all_dense
    handed: list[str] = []
    sizes: list[int] = []

    def consume(stats: dict[str, PackedActivationStats]) -> None:  # decomposes and keeps nothing
        handed.extend(stats)
        sizes.append(sum(s.nbytes for s in stats.values()))
        for entry in stats.values():
            assert np.linalg.eigvalsh(entry.C_X)[-1] > 0

    info = collect_statistics_in_groups(
        ort_session, model, targets, token_batches(40), MemoryBudget(one_block), consume,
        StatisticsSettings(normalized=False),
    )  # fmt: skip
    assert handed == list(distinct_activations(targets))
    assert len(info.groups) == 4  # one block's four activations per group
    assert live["peak"] <= one_block < all_packed
    assert live["peak"] == max(sizes) == info.peak_statistics_bytes
    assert live["now"] == 0


def test_a_budget_below_one_activation_is_a_clear_error() -> None:
    targets = find_targets(tiny_decoder(blocks=1))
    with pytest.raises(EspaceError, match="raise --max-memory to at least"):
        plan_groups(targets, statistics_bytes(64, normalized=False), normalized=False)


def test_groups_count_the_weights_their_sessions_hold() -> None:
    targets = find_targets(tiny_decoder(blocks=2, hidden=32, inter=48))
    budget = 64 * 2**10
    without = plan_groups(targets, budget, normalized=False)
    with_weights = plan_groups(targets, budget, normalized=False, weight_factor=2.0)
    assert len(with_weights) > len(without)
    assert all(g.weight_bytes > 0 for g in with_weights)


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def run_logits(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort_session(path)
    return np.concatenate([session.run(["logits"], batch)[0].reshape(-1) for batch in batches])


def test_streaming_at_full_rank_is_exact(tmp_path: Path) -> None:
    source = save_external(tiny_decoder(blocks=3, hidden=32, inter=48), tmp_path / "tiny.onnx")
    batches = token_batches(40, seed=1)
    budget = statistics_bytes(48, normalized=False) + 8 * 48 * 48 + 2 * 48 * 32 * 4 * 2
    result = compress_streaming(
        source, tmp_path / "out.onnx", batches, RankOptions(rank=64, min_rank=1), StreamingSettings(budget_bytes=budget)
    )
    assert len(result.calibration.groups) > 1
    assert (tmp_path / "out.onnx.data").is_file() and not list(tmp_path.glob(".out.onnx.*"))
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer if len(t.dims) == 2)
    assert len(find_projected_pairs(written)) == len(find_targets(tiny_decoder(blocks=3)))  # the head stays dense
    reference, compressed = run_logits(source, batches), run_logits(tmp_path / "out.onnx", batches)
    assert np.linalg.norm(compressed - reference) <= 1e-5 * np.linalg.norm(reference)


def test_streamed_factors_never_enter_the_model_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes put into a protobuf message stay in its arena until the whole message is freed, cleared or not, so
    the model rewritten group by group grew by every group's factors (benchmarks/scale.py: ≈ 0.13 GiB of
    resident memory per 7B layer); each factor must reach the model already pointing at the data file."""
    import espace_export.streaming as streaming

    rewrites = []

    def checked_project(model: onnx.ModelProto, projections: list, **kwargs: object) -> onnx.ModelProto:
        before = {t.name for t in model.graph.initializer}
        result = project(model, projections, **kwargs)  # type: ignore[arg-type]
        new = [t for t in model.graph.initializer if t.name not in before]
        assert new and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in new)
        rewrites.append(len(new))
        return result

    project = streaming.project
    monkeypatch.setattr(streaming, "project", checked_project)
    source = save_external(tiny_decoder(blocks=3, hidden=32, inter=48), tmp_path / "tiny.onnx")
    batches = token_batches(40, seed=1)
    budget = statistics_bytes(48, normalized=False) + 8 * 48 * 48 + 2 * 48 * 32 * 4 * 2
    result = compress_streaming(
        source,
        tmp_path / "out.onnx",
        batches,
        RankOptions(ratio=0.5, min_rank=4),
        StreamingSettings(budget_bytes=budget),
    )
    assert len(rewrites) == len(result.calibration.groups) > 1
    written = onnx.load(str(tmp_path / "out.onnx"))  # every factor readable from the data file
    assert len(find_projected_pairs(written)) == sum(1 for layer in result.layers if layer["L"] is not None)


@pytest.mark.parametrize("method", ["mse", "nmse"])
def test_streaming_writes_what_the_in_memory_pipeline_writes(tmp_path: Path, method: str) -> None:
    from espace_export import compress

    model = tiny_decoder(blocks=2, hidden=64, inter=128, vocab=50)
    source = save_external(model, tmp_path / "tiny.onnx")
    batches = token_batches(50, count=4, seed=2)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    expected = compress(
        source, ratio=0.5, output=tmp_path / "pipeline.onnx", calib_data=tmp_path / "calib.npz", batch_size=2,
        num_batches=4, holdout=0.0, candidate=method, select="none", min_rank=4,
    )  # fmt: skip
    result = compress_streaming(
        source, tmp_path / "streamed.onnx", batches, RankOptions(ratio=0.5, min_rank=4),
        StreamingSettings(method=method, budget_bytes=2**20),
    )  # fmt: skip
    assert len(result.calibration.groups) > 1
    assert [layer["L"] for layer in result.layers] == [layer["L"] for layer in expected.report["layers"]]
    assert result.targeted_params_after == expected.report["targeted_params_after"]
    streamed, in_memory = (
        run_logits(tmp_path / "streamed.onnx", batches),
        run_logits(tmp_path / "pipeline.onnx", batches),
    )
    assert np.linalg.norm(streamed - in_memory) <= 1e-4 * np.linalg.norm(in_memory)
    for ours, theirs in zip(result.layers, expected.report["layers"], strict=True):
        if ours["mse_relative"] is not None:
            assert ours["mse_relative"] == pytest.approx(theirs["mse_relative"], rel=1e-6, abs=1e-9)


def test_streaming_refuses_methods_that_need_more_than_one_group(tmp_path: Path) -> None:
    source = save_external(tiny_decoder(), tmp_path / "tiny.onnx")
    with pytest.raises(EspaceError, match="weight-free"):
        compress_streaming(
            source, tmp_path / "out.onnx", token_batches(40), settings=StreamingSettings(method="go-mse")
        )
    assert not (tmp_path / "out.onnx").exists()


def test_memory_sizes_parse() -> None:
    assert parse_memory("12G") == 12 * 2**30
    assert parse_memory("800MiB") == 800 * 2**20
    assert parse_memory("1024") == 1024
    assert 0 < parse_memory("50%") < parse_memory("100%")
    with pytest.raises(EspaceError):
        parse_memory("lots")


def test_stages_run_each_node_and_read_each_weight_once() -> None:
    model = tiny_decoder(blocks=3, hidden=32, inter=48)
    activations = list(distinct_activations(find_targets(model)))
    stages = calibration.stage_graph(model, [activations[i : i + 3] for i in range(0, len(activations), 3)])
    ran = [node.name for stage in stages for node in stage.nodes]
    assert len(ran) == len(set(ran))  # no node runs twice
    weights = [name for stage in stages for name in stage.initializers if name.endswith(".weight")]
    assert len(weights) == len(set(weights)) and "lm_head.weight" not in weights  # the head never runs
    for earlier, later in zip(stages, stages[1:], strict=False):  # what a stage reads, an earlier one kept
        assert set(later.inputs) <= set(earlier.keep)


def test_cli_max_memory_compresses_group_by_group_like_the_in_memory_path(tmp_path, capsys) -> None:
    import json

    import onnxruntime as ort

    from tests._cli import run_cli
    from tests._models import tiny_decoder

    source = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(blocks=2, hidden=64, inter=128), source)
    common = ["--rank-rule", "16", "--num-batches", "4", "--seq-len", "32", "-q"]
    bounded, dense = tmp_path / "bounded.onnx", tmp_path / "memory.onnx"
    assert run_cli([str(source), "-o", str(bounded), "--max-memory", "2M", *common], capsys)[0] == 0
    assert run_cli([str(source), "-o", str(dense), *common], capsys)[0] == 0
    a = json.loads(bounded.with_name("bounded.report.json").read_text())
    b = json.loads(dense.with_name("memory.report.json").read_text())
    assert a["targeted_params_after"] == b["targeted_params_after"]
    assert [layer["L"] for layer in a["layers"]] == [layer["L"] for layer in b["layers"]]
    ort.InferenceSession(str(bounded))
    code, _, err = run_cli([str(source), "-o", str(tmp_path / "x.onnx"), "--max-memory", "2M", "--select", "proxy",
                            "--method", "best", *common], capsys)  # fmt: skip
    assert code == 2 and "--max-memory" in err and not (tmp_path / "x.onnx").exists()
    selected = tmp_path / "selected.onnx"
    code, _, err = run_cli([str(source), "-o", str(selected), "--max-memory", "2M", "--select", "proxy", "--ratio",
                            "0.3", *common], capsys)  # fmt: skip
    report = json.loads(selected.with_name("selected.report.json").read_text())
    assert code == 0 and report["select"] == "proxy" and report["selection"]["order"]
    assert 0.3 <= report["targeted_compression"] < a["targeted_compression"]  # units chosen to 0.3, not all at 0.5
    assert any(not layer["compressed"] for layer in report["layers"][:-1])
    ort.InferenceSession(str(selected))


def test_staged_sessions_run_without_the_memory_arena(tmp_path: Path) -> None:
    """The arena's blocks outlive their session, so each stage would leave its largest block resident
    (benchmarks/scale.py: resident memory grew with depth until staged sessions ran without it)."""
    from espace_export.streaming import StreamingSettings, staged_session

    model = tiny_decoder(blocks=1)
    assert staged_session(model).get_session_options().enable_cpu_mem_arena is False
    assert ort_session(model).get_session_options().enable_cpu_mem_arena is True  # other runs keep it
    assert StreamingSettings().session_factory is staged_session


def test_streaming_proxy_selection_chooses_what_the_in_memory_proxy_chooses(tmp_path: Path) -> None:
    """--max-memory --select proxy: units at the per-layer ratio, ranked by the calibrated output error from
    each group's statistics (float32 products), the least harmful applied until the ratio — the layers, ranks,
    scores and outputs of the in-memory ``--method mse --select proxy --no-fill`` run (the bounded path fixes
    ranks before it selects, so it cannot fill); the parked factors leave nothing."""
    from espace_export import compress

    source = save_external(tiny_decoder(blocks=3, hidden=64, inter=128, vocab=50), tmp_path / "tiny.onnx")
    batches = token_batches(50, count=4, seed=2)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    expected = compress(
        source, ratio=0.3, output=tmp_path / "pipeline.onnx", calib_data=tmp_path / "calib.npz", batch_size=2,
        num_batches=4, holdout=0.0, method="mse", select="proxy", min_rank=4, fill=False,
    )  # fmt: skip
    result = compress_streaming(
        source, tmp_path / "streamed.onnx", batches, RankOptions(ratio=0.3, min_rank=4),
        StreamingSettings(budget_bytes=2**20, select="proxy"),
    )  # fmt: skip
    assert len(result.calibration.groups) > 1
    ranks = [layer["L"] for layer in result.layers]
    assert ranks == [layer["L"] for layer in expected.report["layers"]]
    assert None in ranks[:-1] and any(L is not None for L in ranks)  # some units chosen, some left dense
    assert result.targeted_params_after == expected.report["targeted_params_after"]
    harm = {layer["name"]: layer["harm"] for layer in expected.report["layers"] if layer.get("harm") is not None}
    assert result.selection is not None and set(result.selection["harm"]) <= set(harm)
    for unit, score in result.selection["harm"].items():
        assert score == pytest.approx(harm[unit], rel=1e-3)
    assert result.selection["order"] == sorted(result.selection["harm"], key=lambda u: (harm[u], u))
    streamed, in_memory = (
        run_logits(tmp_path / "streamed.onnx", batches),
        run_logits(tmp_path / "pipeline.onnx", batches),
    )
    assert np.linalg.norm(streamed - in_memory) <= 1e-4 * np.linalg.norm(in_memory)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging, no scratch left


@pytest.mark.parametrize("bounded", [False, True])
def test_eigen_settings_reach_every_decomposition(tmp_path, capsys, monkeypatch, bounded: bool) -> None:
    """--eig-solver / --eig-precision / --eig-device hold for the planner's decompositions and, under
    --max-memory, for the group-by-group ones (which ran with the defaults before)."""
    import espace_export.selection.candidates as candidates
    from tests._cli import run_cli

    seen: list[candidates.SolverSettings] = []
    settings = candidates.solver_settings

    def spy() -> candidates.SolverSettings:  # every decomposition reads its settings here
        seen.append(settings())
        return seen[-1]

    monkeypatch.setattr(candidates, "solver_settings", spy)
    source = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(blocks=1, hidden=64, inter=128), source)
    extra = ["--max-memory", "2M"] if bounded else []
    args = [str(source), "-o", str(tmp_path / "c.onnx"), "--num-batches", "2", "--seq-len", "16", "-q", "--rank-rule", "16",
            "--eig-solver", "lapack", "--eig-precision", "float32", *extra]  # fmt: skip
    assert run_cli(args, capsys)[0] == 0
    assert seen and {(s.solver, s.precision, s.device) for s in seen} == {("lapack", "float32", "cpu")}


@pytest.mark.parametrize(("value", "message"), [("gpu", "unknown --eig-device"), ("cuda:7", "no such CUDA device")])
def test_an_unusable_eig_device_is_one_line_before_any_work(tmp_path, capsys, value: str, message: str) -> None:
    from tests._cli import run_cli

    source = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(blocks=1, hidden=64, inter=128), source)
    code, _, err = run_cli(
        [str(source), "-o", str(tmp_path / "c.onnx"), "--rank-rule", "16", "--eig-device", value], capsys
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
