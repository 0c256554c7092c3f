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
    code, err = run_cli(
        [str(source), "-o", str(output), "-q", "--fast", "--calib-data", str(tmp_path / "calib.npz")], capsys
    )
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
    args = [str(source), "-o", str(output), "-q", "--fast", "--calib-data", str(tmp_path / "calib.npz"), "--rank", "4"]
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


# ---------------------------------------------------------------------------------------------- issue 14 classes
# Library entry points, each hostile case must end in one EspaceError line (or, where the input is in
# fact usable, a normal result) — never another exception, never a file written.


def one_line_error(call: Callable[[], object], match: str = "") -> str:
    from espace_export.errors import EspaceError

    with pytest.raises(EspaceError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert match.lower() in message.lower(), message
    return message


# -- plan JSON (load_plan): not UTF-8, nesting, huge or non-finite numbers, out-of-range fields

PLAN_CASES: dict[str, Callable[[dict], bytes]] = {
    "not-utf8": lambda plan: b"\xff\xfe" + json_bytes(plan)[2:],
    "latin1-name": lambda plan: json_bytes(plan).replace(b'"ratio"', b'"r\xe9tio"'),
    "deeply-nested": lambda plan: b"[" * 100_000 + b"]" * 100_000,
    "nested-info": lambda plan: json_bytes({**plan, "info": {}}).replace(
        b'"info": {}', b'"info": ' + b"[" * 50_000 + b"]" * 50_000
    ),
    "nan-literal": lambda plan: json_bytes({**plan, "ratio": 0.5}).replace(b'"ratio": 0.5', b'"ratio": NaN'),
    "infinity-literal": lambda plan: json_bytes({**plan, "ratio": 0.5}).replace(b'"ratio": 0.5', b'"ratio": -Infinity'),
    "huge-float": lambda plan: json_bytes({**plan, "ratio": 0.5}).replace(b'"ratio": 0.5', b'"ratio": 1e999'),
    "huge-int": lambda plan: json_bytes({**plan, "knee": 7}).replace(b'"knee": 7', b'"knee": ' + b"9" * 5000),
    "huge-K": lambda plan: json_bytes(with_layer(plan, K=2**40)),
    "zero-N": lambda plan: json_bytes(with_layer(plan, N=0)),
    "negative-L": lambda plan: json_bytes(with_layer(plan, L=-3)),
    "ratio-above-one": lambda plan: json_bytes({**plan, "ratio": 7}),
    "knee-past-curve": lambda plan: json_bytes({**plan, "knee": 10**6}),
    "scores-text": lambda plan: json_bytes(with_layer(plan, scores={"mse": "low"})),
    "top-level-list": lambda plan: b"[1, 2, 3]",
    "empty-file": lambda plan: b"",
}


def json_bytes(value: object) -> bytes:
    import json

    return json.dumps(value).encode()


def with_layer(plan: dict, **fields: object) -> dict:
    import copy

    changed = copy.deepcopy(plan)
    changed["layers"][0].update(fields)
    return changed


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_malformed_plan_files_are_one_line(case: str, plan_files: dict[str, Path], tmp_path: Path) -> None:
    import json

    from espace_export.io.artifacts import load_plan

    plan = json.loads(plan_files["plan"].read_text())
    path = tmp_path / "plan.json"
    path.write_bytes(PLAN_CASES[case](plan))
    (tmp_path / "plan.npz").write_bytes(plan_files["factors"].read_bytes())
    before = {p: digest(p) for p in tmp_path.iterdir()}
    one_line_error(lambda: load_plan(path), "plan")
    assert {p: digest(p) for p in tmp_path.iterdir()} == before
    CASES_TRIED["plan-json"] = CASES_TRIED.get("plan-json", 0) + 1


# -- statistics files (load_calibration): metadata and arrays


@pytest.fixture(scope="module")
def statistics_file(plan_files: dict[str, Path]) -> Path:
    return plan_files["model"].with_name("stats.npz")


def _stats_arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import json

    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    return json.loads(arrays.pop("meta").tobytes()), arrays


def _meta_array(meta: object) -> np.ndarray:
    import json

    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


STATS_CASES: dict[str, Callable[[dict, dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "meta-not-utf8": lambda meta, arrays: {**arrays, "meta": np.frombuffer(b"\xff\xfe{}", dtype=np.uint8)},
    "meta-nested": lambda meta, arrays: {**arrays, "meta": np.frombuffer(b"[" * 100_000, dtype=np.uint8)},
    "meta-nan": lambda meta, arrays: {
        **arrays,
        "meta": np.frombuffer(json_bytes(meta).replace(b'"rows": ', b'"rows": NaN, "x": ', 1), dtype=np.uint8),
    },
    "meta-missing": lambda meta, arrays: arrays,
    "meta-float-array": lambda meta, arrays: {**arrays, "meta": np.zeros(4)},
    "huge-K": lambda meta, arrays: {**arrays, "meta": _meta_array(_stats_entry(meta, K=10**9))},
    "K-text": lambda meta, arrays: {**arrays, "meta": _meta_array(_stats_entry(meta, K="16"))},
    "negative-rows": lambda meta, arrays: {**arrays, "meta": _meta_array(_stats_entry(meta, rows=-1))},
    "activations-not-list": lambda meta, arrays: {**arrays, "meta": _meta_array({**meta, "activations": 3})},
    "array-missing": lambda meta, arrays: {
        "meta": _meta_array(meta),
        **{k: v for k, v in arrays.items() if k != "xx.0"},
    },
    "array-wrong-shape": lambda meta, arrays: {**arrays, "meta": _meta_array(meta), "xx.0": arrays["xx.0"][:-1]},
    "array-nan": lambda meta, arrays: {
        **arrays,
        "meta": _meta_array(meta),
        "xx.0": np.full_like(arrays["xx.0"], np.nan),
    },
    "array-integers": lambda meta, arrays: {
        **arrays,
        "meta": _meta_array(meta),
        "xx.0": arrays["xx.0"].astype(np.int64),
    },
}


def _stats_entry(meta: dict, **fields: object) -> dict:
    import copy

    changed = copy.deepcopy(meta)
    changed["activations"][0].update(fields)
    return changed


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_malformed_statistics_are_one_line(case: str, statistics_file: Path, tmp_path: Path) -> None:
    from espace_export.io.artifacts import load_calibration

    meta, arrays = _stats_arrays(statistics_file)
    arrays = {k: v for k, v in arrays.items()}
    changed = STATS_CASES[case](meta, arrays)
    path = tmp_path / "stats.npz"
    np.savez(path, **changed)
    one_line_error(lambda: load_calibration(path), "statistics")
    CASES_TRIED["statistics"] = CASES_TRIED.get("statistics", 0) + 1


def test_unchanged_statistics_still_load(statistics_file: Path, tmp_path: Path) -> None:
    """The control for the table above: the file rewritten as it was loads."""
    from espace_export.io.artifacts import load_calibration

    meta, arrays = _stats_arrays(statistics_file)
    np.savez(tmp_path / "stats.npz", meta=_meta_array(meta), **arrays)
    assert load_calibration(tmp_path / "stats.npz").stats


# -- external data entries and weights (load_model)

EXTERNAL_CASES: dict[str, tuple[str, str]] = {
    "nul-in-location": ("location", "zoo.onnx.data\x00../../etc/passwd"),
    "offset-text": ("offset", "twelve"),
    "offset-negative": ("offset", "-64"),
    "offset-float": ("offset", "1.5"),
    "offset-huge": ("offset", "9" * 40),
    "length-text": ("length", "0x10"),
    "length-short": ("length", "4"),
    "length-unicode-digits": ("length", "١٢٣"),
}


@pytest.mark.parametrize("case", sorted(EXTERNAL_CASES))
@pytest.mark.parametrize("load_weights", [False, True])
def test_broken_external_data_entries_are_one_line(case: str, load_weights: bool, tmp_path: Path) -> None:
    from espace_export.io.models import load_model

    source = tmp_path / "zoo.onnx"
    data = write_external(pattern_zoo(), source)
    proto = onnx.load(str(source), load_external_data=False)
    key, value = EXTERNAL_CASES[case]
    entries = proto.graph.initializer[1].external_data
    for entry in entries:
        if entry.key == key:
            entry.value = value
            break
    else:
        entries.add(key=key, value=value)
    source.write_bytes(proto.SerializeToString())
    before = {p: digest(p) for p in (source, data)}
    one_line_error(lambda: load_model(source, load_weights=load_weights))
    assert {p: digest(p) for p in (source, data)} == before
    CASES_TRIED["external-data"] = CASES_TRIED.get("external-data", 0) + 1


def test_zero_size_weights_are_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from espace_export.io.models import load_model

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "empty_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 0])],
        [numpy_helper.from_array(np.zeros((16, 0), np.float32), "w")],
    )
    path = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    one_line_error(lambda: load_model(path), "empty")
    CASES_TRIED["zero-size"] = CASES_TRIED.get("zero-size", 0) + 1


# -- token ids in every batch, option values

TOKEN_CASES = {
    "too-large-in-batch-3": (2, VOCAB, "calibration batch 3"),
    "negative-in-batch-2": (1, -1, "calibration batch 2"),
    "too-large-held-out": (3, VOCAB + 7, "calibration batch 4"),
    "huge": (0, 2**40, "calibration batch 1"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_token_ids_of_every_batch_are_checked(case: str) -> None:
    from espace_export.io.data import check_token_ids, token_id_limits

    limits = token_id_limits(pattern_zoo())
    assert limits == {"ids": VOCAB}
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, VOCAB, size=(2, 5))} for _ in range(4)]
    check_token_ids(batches, limits)  # the clean batches pass
    index, bad, where = TOKEN_CASES[case]
    batches[index]["ids"][1, 2] = bad
    message = one_line_error(lambda: check_token_ids(batches, limits), where)
    assert str(bad) in message
    CASES_TRIED["token-ids"] = CASES_TRIED.get("token-ids", 0) + 1


BAD_PATTERNS = ["(", "[a-", "*", "a{2,1}", "(?P<x", "\\", "x" * 2000]


@pytest.mark.parametrize("pattern", BAD_PATTERNS, ids=range(len(BAD_PATTERNS)))
def test_bad_exclude_patterns_are_one_line(pattern: str) -> None:
    from espace_export.io.data import compile_patterns

    one_line_error(lambda: compile_patterns([r"q_proj", pattern]), "--exclude")
    CASES_TRIED["patterns"] = CASES_TRIED.get("patterns", 0) + 1


SIZE_CASES: list[dict[str, object]] = [
    {"seed": -1},
    {"seed": 2**64},
    {"seed": True},
    {"num_batches": 10**12},
    {"num_batches": 0},
    {"batch_size": -4},
    {"seq_len": 2**40},
    {"num_batches": 2**20, "batch_size": 2**10, "seq_len": 2**10},
]


@pytest.mark.parametrize("case", SIZE_CASES, ids=range(len(SIZE_CASES)))
def test_calibration_sizes_and_seed_are_bounded(case: dict[str, object]) -> None:
    from espace_export.io.data import check_calibration_sizes

    sizes = {"batch_size": 4, "seq_len": 128, "num_batches": 16, "seed": 0, **case}
    one_line_error(lambda: check_calibration_sizes(**sizes))  # type: ignore[arg-type]
    CASES_TRIED["sizes"] = CASES_TRIED.get("sizes", 0) + 1


def test_reasonable_sizes_pass() -> None:
    from espace_export.io.data import check_calibration_sizes, compile_patterns

    check_calibration_sizes(batch_size=4, seq_len=128, num_batches=16, seed=2**63 - 1)
    assert [p.pattern for p in compile_patterns([r"lm_head", r"\(x\)"])] == ["lm_head", r"\(x\)"]


# -- reports: strict JSON out


def test_reports_with_nan_are_written_as_strict_json() -> None:
    import json

    from espace_export.io.models import strict_json

    text = strict_json({"notes": [], "layers": [{"mse": float("nan")}, {"mse": np.float32("inf")}], "ok": 1.5})
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert report["layers"] == [{"mse": None}, {"mse": None}] and report["ok"] == 1.5
    assert "layers[0].mse was nan" in report["notes"][0] and "layers[1].mse was inf" in report["notes"][0]
    assert "non_finite" in json.loads(strict_json({"x": float("-inf")}))


# -- models given to build / profile: garbage, truncated, cyclic, custom ops, escaped data


def _cyclic_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["b"], name="second"),
        ],
        "cycle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _custom_op_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["y"], name="custom", domain="my.company")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.company", 1)])


MODEL_CASES: dict[str, Callable[[Path], None]] = {
    "garbage": lambda path: path.write_bytes(b"\x00\x01garbage" * 100),
    "text": lambda path: path.write_text("this is not a model"),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(pattern_zoo().SerializeToString()[:300]),
    "cyclic": lambda path: path.write_bytes(_cyclic_model().SerializeToString()),
    "custom-op": lambda path: path.write_bytes(_custom_op_model().SerializeToString()),
    "escaped-data": lambda path: _escaped(path),
    "directory": lambda path: path.mkdir(),
}


def _escaped(path: Path) -> None:
    data = write_external(pattern_zoo(), path)
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].external_data[0].value = "../outside.data"
    path.write_bytes(proto.SerializeToString())
    (path.parent.parent / "outside.data").write_bytes(data.read_bytes())


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_build_and_profile_refuse_broken_models_in_one_line(case: str, tmp_path: Path) -> None:
    from espace_export.deploy.build import build_model, load_structure
    from espace_export.deploy.profile import ProfileSettings, profile

    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model.onnx"
    MODEL_CASES[case](path)
    good = folder / "good.onnx"
    onnx.save(pattern_zoo(), good)
    one_line_error(lambda: load_structure(path))
    one_line_error(lambda: build_model(path, seq=4))
    settings = ProfileSettings(seq=4, warmup=0, repeats=1)
    one_line_error(lambda: profile(good, path, settings, output=tmp_path / "p.json"))
    one_line_error(lambda: profile(path, good, settings, output=tmp_path / "p.json"))
    assert not list(tmp_path.glob("p.*"))
    CASES_TRIED["models"] = CASES_TRIED.get("models", 0) + 4


# -- check: malformed reports are exit 2, not "regressed" (exit 1)


@pytest.fixture(scope="module")
def profile_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from espace_export.deploy.build import BuildSettings
    from espace_export.deploy.gate import load_report
    from espace_export.deploy.profile import ProfileSettings, profile
    from tests._models import compress_tiny, tiny_decoder

    directory = tmp_path_factory.mktemp("gate-hostile")
    paths = directory / "tiny.onnx", directory / "tiny.espace.onnx"
    onnx.save(tiny_decoder(), str(paths[0]))
    onnx.save(compress_tiny(tiny_decoder()), str(paths[1]))
    settings = ProfileSettings(seq=8, warmup=0, repeats=6, build=BuildSettings(threads=1))
    report = load_report(profile(*paths, settings, output=directory / "base.json").paths["json"])
    report.pop("_source")
    return report


def _set(report: dict, path: str, value: object) -> dict:
    import copy

    changed = copy.deepcopy(report)
    node: object = changed
    keys = path.split("/")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    last = keys[-1]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]  # type: ignore[arg-type]
    else:
        node[int(last) if isinstance(node, list) else last] = value  # type: ignore[index]
    return changed


_DELETE = object()
REPORT_CASES: dict[str, tuple[str, object]] = {
    "ttft-ratio-null": ("ttft/ratio", None),
    "ttft-ratio-text": ("ttft/ratio", "0.8"),
    "ttft-ratio-negative": ("ttft/ratio", -0.5),
    "ttft-ratio-zero": ("ttft/ratio", 0),
    "ttft-ratio-bool": ("ttft/ratio", True),
    "gemm-ratio-null": ("gemm/ratio", None),
    "gemm-groups-text": ("gemm/groups", "none"),
    "group-not-object": ("gemm/groups/0", 7),
    "group-count-zero": ("gemm/groups/0/count", 0),
    "group-ratio-missing": ("gemm/groups/0/ratio", _DELETE),
    "sample-null": ("ttft/original_ms/samples/0", None),
    "sample-negative": ("ttft/compressed_ms/samples/1", -1.0),
    "samples-text": ("ttft/original_ms/samples", "fast"),
    "ttft-original-missing": ("ttft/original_ms", _DELETE),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
@pytest.mark.parametrize("side", ["current", "baseline"])
def test_malformed_reports_are_exit_2_not_regressions(
    case: str, side: str, profile_report: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    key, value = REPORT_CASES[case]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(_set(profile_report, key, value)))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(profile_report))
    current, baseline = (broken, good) if side == "current" else (good, broken)
    code, err = run_cli(["check", str(current), "--baseline", str(baseline)], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "profile again" in lines[0], err
    CASES_TRIED["reports"] = CASES_TRIED.get("reports", 0) + 1


RAW_REPORT_CASES: dict[str, bytes] = {
    "not-utf8": b'{"kind": "profile", "x": "\xff"}',
    "nan-literal": b'{"kind": "profile", "ttft": {"ratio": NaN}}',
    "infinity-literal": b'{"kind": "profile", "ttft": {"ratio": Infinity}}',
    "huge-number": b'{"kind": "profile", "ttft": {"ratio": 1e400}}',
    "deeply-nested": b'{"kind": "profile", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "truncated": b'{"kind": "profile", "ttft": {"ra',
}


@pytest.mark.parametrize("case", sorted(RAW_REPORT_CASES))
def test_unreadable_reports_are_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    report.write_bytes(RAW_REPORT_CASES[case])
    code, err = run_cli(["check", str(report), "--baseline", str(report)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    CASES_TRIED["reports"] = CASES_TRIED.get("reports", 0) + 1


@pytest.mark.parametrize("value", [5, 100, -0.1, float("nan"), float("inf"), float("-inf")])
def test_max_regression_outside_a_fraction_is_refused(value: float, profile_report: dict) -> None:
    from espace_export.deploy.gate import compare

    message = one_line_error(lambda: compare(profile_report, profile_report, max_regression=value), "max-regression")
    if value in (5, 100):
        assert f"--max-regression {value / 100:g}" in message  # the hint says what was probably meant
    CASES_TRIED["max-regression"] = CASES_TRIED.get("max-regression", 0) + 1


def test_summary_paths(profile_report: dict, tmp_path: Path) -> None:
    from espace_export.deploy.gate import append_summary, compare, summary_path

    report = tmp_path / "report.json"
    report.write_text("{}")
    assert summary_path("") is None and summary_path("  ") is None and summary_path(None) is None
    one_line_error(lambda: summary_path(tmp_path), "is a directory")
    one_line_error(lambda: summary_path(tmp_path / "missing" / "s.md"), "does not exist")
    one_line_error(lambda: summary_path(report, reports=[report]), "would overwrite")
    target = summary_path(tmp_path / "summary.md", reports=[report])
    append_summary(compare(profile_report, profile_report), target)
    append_summary(compare(profile_report, profile_report), None)
    assert "passed" in (tmp_path / "summary.md").read_text()
    CASES_TRIED["summary"] = CASES_TRIED.get("summary", 0) + 4


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_report_is_a_verdict_or_one_line(data: st.DataObject, profile_report: dict) -> None:
    """Random fields replaced, dropped or retyped anywhere in a real profile report: ``compare`` returns
    a verdict or raises one EspaceError line — never another exception."""
    from espace_export.deploy.gate import compare
    from espace_export.errors import EspaceError

    mutated = _mutate_json(profile_report, data)
    first = data.draw(st.booleans())
    pair = (mutated, profile_report) if first else (profile_report, mutated)
    try:
        result = compare(*pair, allow_mismatch=True)  # type: ignore[arg-type]
    except EspaceError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(row.status in ("ok", "regressed", "improved", "uncertain", "missing", "new") for row in result.rows)
    CASES_TRIED["report-mutations"] = CASES_TRIED.get("report-mutations", 0) + 1


def test_gate_verdicts_follow_the_interval(profile_report: dict) -> None:
    """Noise-aware verdicts on a real report whose TTFT rounds are replaced by 30 quiet ones (2 % jitter):
    every compressed round 1.5× slower regresses beyond the noise; the report against itself passes."""
    import copy

    from espace_export.deploy.gate import compare

    rng = np.random.default_rng(0)
    quiet = copy.deepcopy(profile_report)
    for side, ms in (("original_ms", 2.0), ("compressed_ms", 1.2)):
        quiet["ttft"][side]["samples"] = [float(v) for v in ms * (1 + 0.02 * rng.standard_normal(30))]
    slower = copy.deepcopy(quiet)
    slower["ttft"]["compressed_ms"]["samples"] = [1.5 * v for v in slower["ttft"]["compressed_ms"]["samples"]]
    row = next(r for r in compare(slower, quiet).rows if r.metric == "ttft.ratio")
    assert row.status == "regressed" and row.interval is not None and row.interval[0] > 0.05
    assert row.change == pytest.approx(0.5)
    assert compare(quiet, quiet).passed


# ---------------------------------------------------------------------------------------------- every subcommand
# Hostile options found still breaking the promise after the classes above (a traceback, exit 0 on a
# nonsense value, a Typer panel of many lines): each must end in one `error:` line, exit 2, no file
# written, no input modified. ``{model}``, ``{compressed}``, ``{stats}`` (statistics without the
# normalised sums) and ``{out}`` (a fresh folder) are filled in per case.

SUBCOMMAND_CASES: dict[str, tuple[str, str]] = {
    # compress / inspect: rank rules that are not pow2 nor an ASCII granularity
    "compress-rank-rule-superscript": ("{model} -o {out}/o.onnx --rank-rule ²", "rank rule"),
    "compress-rank-rule-arabic-digits": ("{model} -o {out}/o.onnx --rank-rule ١٦", "rank rule"),
    "compress-rank-rule-float": ("{model} -o {out}/o.onnx --rank-rule 16.0", "rank rule"),
    "compress-rank-rule-huge": ("{model} -o {out}/o.onnx --rank-rule 99999999999999", "rank rule"),
    "compress-rank-rule-zero": ("{model} -o {out}/o.onnx --rank-rule 0", "granularity"),
    "compress-unknown-option": ("{model} -o {out}/o.onnx --no-such-option", "no such option"),
    "inspect-rank-rule-superscript": ("inspect {model} --rank-rule ²", "rank rule"),
    # calibrate: a usage error is one line too
    "calibrate-unknown-method": ("calibrate {model} -o {out}/s.npz --method bogus", "--method"),
    "calibrate-missing-model": ("calibrate", "missing argument"),
    # plan: statistics that lack what the method needs
    "plan-best-proxy-without-normalised-sums": (
        "plan {model} --statistics {stats} -o {out}/p.json --method best --select proxy",
        "calibrate MODEL --method best",
    ),
    "plan-nmse-without-normalised-sums": (
        "plan {model} --statistics {stats} -o {out}/p.json --method nmse",
        "normalised sums",
    ),
    "plan-nl-mse-without-gradients": (
        "plan {model} --statistics {stats} -o {out}/p.json --method nl-mse",
        "gradient statistics",
    ),
    # apply
    "apply-missing-plan": ("apply {model} -o {out}/o.onnx", "--plan"),
    "apply-rank-rule-superscript": ("apply {model} --plan {out}/p.json -o {out}/o.onnx --rank-rule ²", "rank rule"),
    # build: thread counts and prompt sizes out of range
    "build-negative-threads": ("build {compressed} --threads -1 --seq 4", "--threads"),
    "build-huge-threads": ("build {compressed} --threads 99999 --seq 4", "--threads"),
    "build-huge-prompt": ("build {compressed} --seq 100000000000", "tokens exceeds"),
    "build-huge-batch": ("build {compressed} --seq 1000 --batch 99999999", "tokens exceeds"),
    "build-max-seq-zero-on-cpu": ("build {compressed} --max-seq 0 --seq 4", "tensorrt"),
    # profile
    "profile-negative-threads": ("profile {model} {compressed} --threads -2 -o {out}/p.json", "--threads"),
    "profile-huge-prompt": ("profile {model} {compressed} --seq 100000000000 -o {out}/p.json", "tokens exceeds"),
    "profile-huge-repeats": ("profile {model} {compressed} --repeats 10000000000 -o {out}/p.json", "--repeats"),
    "profile-huge-warmup": ("profile {model} {compressed} --warmup 99999999 -o {out}/p.json", "--warmup"),
    "profile-repeats-not-a-number": ("profile {model} {compressed} --repeats abc -o {out}/p.json", "--repeats"),
    # check
    "check-missing-baseline": ("check {out}/p.json", "--baseline"),
    "check-unknown-option": ("check {out}/p.json --baseline {out}/p.json --fail-fast", "no such option"),
}


@pytest.fixture(scope="module")
def subcommand_inputs(plan_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests._models import compress_tiny, tiny_decoder

    folder = tmp_path_factory.mktemp("subcommands")
    tiny = tiny_decoder()
    compressed = folder / "tiny.espace.onnx"
    onnx.save(compress_tiny(tiny), str(compressed))
    stats = plan_files["model"].with_name("stats.npz")
    from espace_export.io.artifacts import load_calibration

    assert not any(s.normalized for s in load_calibration(stats).stats.values())  # made for --method mse
    return {"model": plan_files["model"], "compressed": compressed, "stats": stats}


@pytest.mark.parametrize("case", sorted(SUBCOMMAND_CASES))
def test_every_subcommand_refuses_hostile_options_in_one_line(
    case: str, subcommand_inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex

    template, expected = SUBCOMMAND_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    args = shlex.split(template.format(out=out, **subcommand_inputs))
    inputs = {p: digest(p) for p in subcommand_inputs.values()}
    code, err = run_cli(args, capsys)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert expected.lower() in lines[0].lower(), lines[0]
    assert list(out.iterdir()) == [], "a refused run wrote files"
    assert {p: digest(p) for p in inputs} == inputs, "an input was modified"
    CASES_TRIED["subcommands"] = CASES_TRIED.get("subcommands", 0) + 1
