"""The command line: help, the main job, and one clear line (exit 2, no file) for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests._cli import run_cli


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def no_gemm_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_help_lists_commands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "compress" in out
    code, out, _ = run_cli(["compress", "--help"], capsys)
    assert code == 0 and "--ratio" in out and "--calib-data" in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("espace-export ")


@pytest.mark.slow
def test_main_job_runs_and_prints_the_summary(
    sample_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "llama.onnx"
    source.write_bytes(sample_model("llama", "torchscript", hidden=128, intermediate=256).read_bytes())
    with pytest.warns(UserWarning, match="random token ids"):  # the smoke-run warning
        code, out, err = run_cli([str(source), "--ratio", "0.5", "--num-batches", "3", "--seq-len", "32"], capsys)
    assert code == 0, err
    assert "targeted compression" in out and "wrote" in out
    output = tmp_path / "llama.espace.onnx"
    report = json.loads((tmp_path / "llama.espace.report.json").read_text())
    assert output.exists() and report["targeted_compression"] >= 0.5
    code, out, _ = run_cli([str(source), "-o", str(tmp_path / "j.onnx"), "--json", "--num-batches", "2"], capsys)
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "j.onnx")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, sample_model: Callable[..., Path]) -> dict[str, list[str]]:
    base = tmp_path_factory.mktemp("bad")
    good = base / "good.onnx"
    good.write_bytes(sample_model("llama", "torchscript").read_bytes())
    text = base / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = base / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    relu = no_gemm_model(base / "relu.onnx")
    ids = np.random.default_rng(0).integers(0, 256, size=(4, 8))
    np.savez(base / "wrong_name.npz", tokens=ids)
    np.savez(base / "wrong_dtype.npz", input_ids=ids.astype(np.float32))
    np.savez(base / "wrong_rank.npz", input_ids=ids.reshape(4, 8, 1))
    np.savez(base / "empty.npz", input_ids=ids[:0])
    (base / "file_not_dir").write_text("x")
    return {
        "missing path": [str(base / "absent.onnx")],
        "not onnx": [str(text)],
        "truncated": [str(truncated)],
        "no compressible gemm": [str(relu)],
        "ratio zero": [str(good), "--ratio", "0"],
        "ratio one": [str(good), "--ratio", "1"],
        "ratio negative": [str(good), "--ratio", "-0.5"],
        "ratio above one": [str(good), "--ratio", "1.5"],
        "calib name": [str(good), "--calib-data", str(base / "wrong_name.npz")],
        "calib dtype": [str(good), "--calib-data", str(base / "wrong_dtype.npz")],
        "calib shape": [str(good), "--calib-data", str(base / "wrong_rank.npz")],
        "calib empty": [str(good), "--calib-data", str(base / "empty.npz")],
        "calib missing": [str(good), "--calib-data", str(base / "absent.npz")],
        # a missing output directory is created, but only when the run commits: bad input leaves none behind
        "output dir missing, input bad": [
            str(good),
            "--calib-data",
            str(base / "wrong_dtype.npz"),
            "-o",
            str(base / "no" / "such" / "m.onnx"),
        ],
        "output under a file": [str(good), "-o", str(base / "file_not_dir" / "m.onnx")],
        "output is a directory": [str(good), "-o", str(base)],
        "text without tokenizer": [str(good), "--calib-text", "builtin:pydoc"],
        "bad rank rule": [str(good), "--rank-rule", "prime"],
    }


CASES = [
    "missing path", "not onnx", "truncated", "no compressible gemm", "ratio zero", "ratio one", "ratio negative",
    "ratio above one", "calib name", "calib dtype", "calib shape", "calib empty", "calib missing",
    "output dir missing, input bad", "output under a file", "output is a directory", "text without tokenizer", "bad rank rule",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_exit_2_and_no_file(
    case: str, bad_inputs: dict[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    args = bad_inputs[case]
    directory = Path(args[0]).parent
    before = listing(directory)
    code, out, err = run_cli(args + ["-q"], capsys)
    assert code == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert listing(directory) == before


@pytest.mark.slow
def test_output_parent_directories_are_created(
    sample_model: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-o build/sub/model.onnx`` works as in Polygraphy and most converters: the parents are made."""
    source = tmp_path / "llama.onnx"
    source.write_bytes(sample_model("llama", "torchscript").read_bytes())
    monkeypatch.chdir(tmp_path)
    args = [str(source), "-o", "build/sub/model.onnx", "--num-batches", "2", "--seq-len", "16", "-q"]
    with pytest.warns(UserWarning, match="random token ids"):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    written = sorted(str(p.relative_to(tmp_path / "build")) for p in (tmp_path / "build").rglob("*"))
    assert written == ["sub", "sub/model.onnx", "sub/model.report.json", "sub/model.report.md"]
    onnx.checker.check_model(str(tmp_path / "build" / "sub" / "model.onnx"))


def test_bad_input_through_the_installed_entry_point(tmp_path: Path) -> None:
    """The real process: one line on stderr, exit status 2, no traceback."""
    text = tmp_path / "bad.onnx"
    text.write_text("garbage")
    done = subprocess.run(
        [sys.executable, "-m", "espace_export", str(text), "--ratio", "0.5"],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "not a valid ONNX model" in done.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


@pytest.mark.parametrize("args", [["--candidate", "pca"], ["--ratio", "half"], ["--no-such-option"]])
def test_usage_errors_exit_2_without_traceback(args: list[str], tmp_path: Path) -> None:
    model = no_gemm_model(tmp_path / "m.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "espace_export", str(model), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()  # one line like any other bad input, with where to look
    assert len(lines) == 1 and lines[0].startswith("error: ") and "espace-export compress --help" in lines[0], lines
