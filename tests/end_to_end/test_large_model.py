"""A model past the 2 GB protobuf limit, end to end: load, calibrate, rewrite, save, move, run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from espace_export.cli import main

HIDDEN, WIDE, BRANCHES, VOCAB = 2048, 16384, 17, 1000  # 17 × 2048 × 16384 × 4 B = 2.28 GB of weights


def external_tensor(name: str, array_source: np.ndarray, shape: tuple[int, ...], data, location: str):
    """A float32 initializer whose bytes are appended to the open data file (never held whole in memory)."""
    offset = data.tell()
    rows_per_chunk = max(1, (64 << 20) // (shape[1] * 4))
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        # cheap, deterministic, full-rank-ish values: a random block rolled per chunk
        block = np.roll(array_source, start, axis=0)[: rows * shape[1]].reshape(rows, shape[1])
        data.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.tell() - offset))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build_large_model(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    source = (rng.standard_normal(HIDDEN * WIDE + WIDE) / np.sqrt(HIDDEN)).astype(np.float32)
    path = directory / "big.onnx"
    location = "big.onnx.data"
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="embed")]
    initializers = []
    with open(directory / location, "wb") as data:
        initializers.append(external_tensor("embed", source, (VOCAB, HIDDEN), data, location))
        for i in range(BRANCHES):
            initializers.append(
                external_tensor(f"branch{i}.weight", np.roll(source, 7919 * i), (HIDDEN, WIDE), data, location)
            )
            nodes.append(helper.make_node("MatMul", ["x", f"branch{i}.weight"], [f"y{i}"], name=f"/branch{i}/MatMul"))
    total = "y0"
    for i in range(1, BRANCHES):
        nodes.append(helper.make_node("Add", [total, f"y{i}"], [f"sum{i}"], name=f"add{i}"))
        total = f"sum{i}"
    nodes.append(helper.make_node("Identity", [total], ["out"], name="out"))
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", WIDE])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.slow
def test_model_past_2gb_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.disk_usage(tmp_path).free < 8 << 30:
        pytest.skip("needs 8 GB of free disk for a >2 GB model and its outputs")
    started = time.perf_counter()
    source = build_large_model(tmp_path)
    built = time.perf_counter() - started
    data_size = (tmp_path / "big.onnx.data").stat().st_size
    assert data_size > 2**31
    output = tmp_path / "out" / "big.espace.onnx"
    output.parent.mkdir()
    args = [str(source), "-o", str(output), "--ratio", "0.5", "--num-batches", "3", "--batch-size", "2",
            "--seq-len", "16", "--json"]  # fmt: skip
    try:
        main(args)
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["layers_compressed"] == BRANCHES
    assert report["targeted_compression"] >= 0.5
    # one external data file beside the output, with a relative location
    assert sorted(p.name for p in output.parent.iterdir()) == ["big.espace.onnx", "big.espace.onnx.data",
                                                               "big.espace.report.json", "big.espace.report.md"]  # fmt: skip
    locations = {
        entry.value
        for tensor in onnx.load(str(output), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"big.espace.onnx.data"}
    # move the pair elsewhere: it still loads, checks and runs, and matches the original's projected outputs
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("big.espace.onnx", "big.espace.onnx.data"):
        shutil.move(output.parent / name, moved / name)
    onnx.checker.check_model(str(moved / "big.espace.onnx"))
    ids = np.random.default_rng(5).integers(0, VOCAB, size=(1, 8))
    compressed = ort.InferenceSession(str(moved / "big.espace.onnx")).run(None, {"input_ids": ids})[0]
    original = ort.InferenceSession(str(source)).run(None, {"input_ids": ids})[0]
    assert compressed.shape == original.shape and np.isfinite(compressed).all()
    cosine = float(np.sum(compressed * original) / (np.linalg.norm(compressed) * np.linalg.norm(original)))
    assert cosine > 0.3  # random weights, rank 512 of 2048: a real but lossy approximation
    stages = {**report["timings_s"], "build_test_model": round(built, 1)}
    print(f"\n>2GB model: {data_size / 2**30:.2f} GiB of weights; wall time per stage (s): {stages}")
