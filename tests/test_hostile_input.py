"""Hostile input: corrupted models, broken external data, bad calibration arrays, signals mid-run.

Every case must end in either a valid compressed model (exit 0: a flipped weight byte is still a model)
or one ``error:`` line with exit status 2 — never a traceback, never an output file, never a modified input.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espace_export.cli import main
from tests import _cli as cli
from tests._graphs import HIDDEN, VOCAB, pattern_zoo

CASES_TRIED: dict[str, int] = {}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of ``espace-export ARGS``: all a hostile case looks at."""
    code, _, err = cli.run_cli(args, capsys)
    return code, err


def assert_clean_outcome(code: int, err: str, output: Path, inputs: dict[Path, str]) -> None:
    assert "Traceback" not in err
    for path, before in inputs.items():
        assert digest(path) == before, f"{path} was modified"
    leftovers = [p.name for p in output.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    if code == 0:
        onnx.checker.check_model(str(output))
    else:
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not output.exists()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, sample_model: Callable[..., Path]) -> bytes:
    return sample_model("llama", "torchscript", hidden=32, layers=1).read_bytes()


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_model_bytes(
    data: st.DataObject, small_model: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blob = bytearray(small_model)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "zero-run"]))
    if kind == "flip":
        for position in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[position] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "splice":
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(blob) - 1))
        blob[start : start + data.draw(st.integers(1, 4096))] = b"\0" * min(4096, len(blob) - start)
    CASES_TRIED[kind] = CASES_TRIED.get(kind, 0) + 1
    case = tmp_path / f"case{sum(CASES_TRIED.values())}"
    case.mkdir()
    source = case / "model.onnx"
    source.write_bytes(bytes(blob))
    output = case / "out.onnx"
    before = {source: digest(source)}
    code, err = run_cli(
        [str(source), "-o", str(output), "-q", "--num-batches", "2", "--seq-len", "8", "--min-rank", "4"], capsys
    )
    assert_clean_outcome(code, err, output, before)


def write_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path.with_name(path.name + ".data")


@pytest.mark.parametrize("damage", ["truncate", "empty", "missing", "garbage-location"])
def test_broken_external_data(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "zoo.onnx"
    data = write_external(pattern_zoo(), source)
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    elif damage == "empty":
        data.write_bytes(b"")
    elif damage == "missing":
        data.unlink()
    else:
        proto = onnx.load(str(source), load_external_data=False)
        proto.graph.initializer[0].external_data[0].value = "../../etc/passwd"
        source.write_bytes(proto.SerializeToString())
    inputs = {p: digest(p) for p in (source, data) if p.exists()}
    output = tmp_path / "out.onnx"
    code, err = run_cli([str(source), "-o", str(output), "-q"], capsys)
    assert code == 2
    assert_clean_outcome(code, err, output, inputs)


@pytest.mark.parametrize("poison", ["nan", "inf", "zero-rows", "ragged"])
def test_bad_float_calibration_arrays(poison: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "zoo.onnx"
    onnx.save(pattern_zoo(), source)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(6, 5))
    x2 = rng.standard_normal((6, HIDDEN)).astype(np.float32)
    if poison == "nan":
        x2[2, 3] = np.nan
    elif poison == "inf":
        x2[0, 0] = -np.inf
    elif poison == "zero-rows":
        ids, x2 = ids[:0], x2[:0]
    else:
        x2 = x2[:4]
    np.savez(tmp_path / "calib.npz", ids=ids, x2=x2)
    inputs = {p: digest(p) for p in (source, tmp_path / "calib.npz")}
    output = tmp_path / "out.onnx"
    code, err = run_cli([str(source), "-o", str(output), "-q", "--calib-data", str(tmp_path / "calib.npz")], capsys)
    assert code == 2
    assert_clean_outcome(code, err, output, inputs)


def test_good_float_calibration_arrays_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control case for the test above: the same arrays, clean, compress fine."""
    source = tmp_path / "zoo.onnx"
    onnx.save(pattern_zoo(), source)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "calib.npz",
        ids=rng.integers(0, VOCAB, size=(8, 5)),
        x2=rng.standard_normal((8, HIDDEN)).astype(np.float32),
    )
    output = tmp_path / "out.onnx"
    args = [str(source), "-o", str(output), "-q", "--calib-data", str(tmp_path / "calib.npz"), "--rank", "4"]
    code, err = run_cli(args + ["--batch-size", "2"], capsys)
    assert code == 0, err
    onnx.checker.check_model(str(output))


def _clean_signal_state() -> None:
    """In the child, before exec: nothing inherited from the test process may block or ignore the signals."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_write_keeps_the_previous_output(
    signum: int, sample_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Signal a run at the worst moment: the new model and report are fully written to their temporary
    directory but not yet renamed. The run must stop, remove its temporary files, and leave the previous
    output byte for byte as it was."""
    source = tmp_path / "model.onnx"
    source.write_bytes(sample_model("llama", "torchscript").read_bytes())
    command = [sys.executable, "-m", "espace_export", str(source), "-q", "--num-batches", "3", "--seq-len", "16"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(command + ["--ratio", "0.5", "--min-rank", "4"], check=True, capture_output=True, env=env,
                   timeout=300)  # fmt: skip
    previous = {p.name: digest(p) for p in tmp_path.iterdir() if p.name.startswith("model.espace")}
    process = subprocess.Popen(
        command + ["--ratio", "0.3", "--min-rank", "4"], stderr=subprocess.PIPE,
        env={**env, "ESPACE_TEST_PAUSE_BEFORE_RENAME": "60"}, preexec_fn=_clean_signal_state,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".model.espace*.tmp/.complete")):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the run never reached its rename"
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0, err
    assert b"Traceback" not in err
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name.startswith("model.espace")} == previous
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory: pytest.TempPathFactory, sample_model: Callable[..., Path]) -> dict[str, Path]:
    """A model, and a valid plan made for it by the calibrate → plan stages."""
    base = tmp_path_factory.mktemp("plans")
    model = base / "model.onnx"
    model.write_bytes(sample_model("llama", "torchscript").read_bytes())
    for args in (
        ["calibrate", str(model), "-o", str(base / "stats.npz"), "--num-batches", "3", "--seq-len", "16", "-q"],
        ["plan", str(model), "--statistics", str(base / "stats.npz"), "-o", str(base / "plan.json"),
         "--min-rank", "4", "-q"],
    ):  # fmt: skip
        try:
            main(args)
        except SystemExit as exit_:
            assert not exit_.code
    return {"model": model, "plan": base / "plan.json", "factors": base / "plan.npz"}


def _mutate_json(value: object, data: st.DataObject, depth: int = 0) -> object:
    """Replace, drop or retype one field somewhere in the plan."""
    if isinstance(value, dict) and value and depth < 4:
        key = data.draw(st.sampled_from(sorted(value)))
        action = data.draw(st.sampled_from(["recurse", "drop", "replace", "add"]))
        copy = dict(value)
        if action == "recurse":
            copy[key] = _mutate_json(copy[key], data, depth + 1)
        elif action == "drop":
            del copy[key]
        elif action == "replace":
            copy[key] = data.draw(
                st.one_of(st.none(), st.integers(-5, 10**6), st.text(max_size=8), st.lists(st.integers(), max_size=2))
            )
        else:
            copy["unexpected_" + data.draw(st.text("abc", min_size=1, max_size=3))] = 1
        return copy
    if isinstance(value, list) and value and depth < 4:
        index = data.draw(st.integers(0, len(value) - 1))
        copy = list(value)
        if data.draw(st.booleans()):
            copy[index] = _mutate_json(copy[index], data, depth + 1)
        else:
            del copy[index]
        return copy
    return data.draw(st.one_of(st.none(), st.integers(-3, 5000), st.floats(allow_nan=True), st.text(max_size=6)))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mismatched_or_corrupted_plans(
    data: st.DataObject, plan_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    case = tmp_path / f"plan{len(list(tmp_path.iterdir()))}"
    case.mkdir()
    plan, factors = case / "plan.json", case / "plan.npz"
    original = json.loads(plan_files["plan"].read_text())
    target = data.draw(st.sampled_from(["json", "factors", "both"]))
    plan.write_text(json.dumps(_mutate_json(original, data)) if target != "factors" else json.dumps(original))
    if target == "json":
        factors.write_bytes(plan_files["factors"].read_bytes())
    else:
        with np.load(plan_files["factors"]) as archive:
            arrays = {k: archive[k] for k in archive.files}
        key = data.draw(st.sampled_from(sorted(arrays)))
        change = data.draw(st.sampled_from(["drop", "transpose", "shrink", "nan", "garbage"]))
        if change == "drop":
            del arrays[key]
        elif change == "transpose":
            arrays[key] = arrays[key].T.copy()
        elif change == "shrink":
            arrays[key] = arrays[key][:-1]
        elif change == "nan":
            arrays[key] = np.full_like(arrays[key], np.nan)
        if change == "garbage":
            factors.write_bytes(data.draw(st.binary(max_size=64)))
        else:
            np.savez(factors, **arrays)
    inputs = {p: digest(p) for p in (plan_files["model"], plan, factors)}
    output = case / "out.onnx"
    code, err = run_cli(["apply", str(plan_files["model"]), "--plan", str(plan), "-o", str(output), "-q"], capsys)
    assert_clean_outcome(code, err, output, inputs)


@pytest.mark.parametrize("content", ["garbage", "pickled", "truncated"])
def test_unreadable_npz_files_are_one_line_errors(content: str, tmp_path: Path) -> None:
    """Calibration data, statistics, plan factors and projection files share one reader."""
    from espace_export.errors import EspaceError
    from espace_export.heal import load_projections
    from espace_export.io.models import read_arrays

    path = tmp_path / "bad.npz"
    if content == "garbage":
        path.write_bytes(b"not a zip at all")
    elif content == "pickled":
        np.savez(path, objects=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(path, x=np.arange(1000))
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EspaceError, match="cannot read projections"):
        read_arrays(path, "projections", "fix")
    with pytest.raises(EspaceError, match="cannot read projections"):
        load_projections(path)
