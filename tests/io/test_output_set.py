"""Outputs never overwrite inputs, and an output set (model, data file, report twins) flips as one unit.

The fault tests run a small writer in a child process, stop it with the test-only pause hooks (all files
written, nothing moved; or one file moved, the rest not) and signal or kill it there. Every file of a set
holds its generation's tag, so "whole and consistent" is checked by reading the tags back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from espace_export.errors import EspaceError
from espace_export.io.models import (
    atomic_output_set,
    check_distinct_paths,
    clean_stale_temporaries,
    curve_files,
    hold,
    load_model,
    model_files,
    output_lock,
    plan_files,
    report_files,
    runtime_source,
    save_model,
)
from tests._graphs import pattern_zoo
from tests._repo import ROOT as REPO

# ---------------------------------------------------------------------------------------------- distinct paths


@pytest.fixture()
def model_with_data(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "model.onnx"
    onnx.save_model(pattern_zoo(), str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path, tmp_path / "weights.bin"


def test_distinct_paths_pass(model_with_data: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = model_with_data
    out = tmp_path / "model.espace.onnx"
    check_distinct_paths(
        {"MODEL": model, "--calib-data": None},
        {"-o": model_files(out), "--report": report_files(tmp_path / "r.json"), "--statistics": tmp_path / "s.npz"},
    )


@pytest.mark.parametrize(
    "case",
    [
        "output-is-model",
        "output-symlink-to-model",
        "output-hardlink-to-model",
        "output-is-data-file",
        "output-data-twin-is-input-data",
        "plan-twin-is-statistics",
        "report-md-twin-is-calib",
        "curve-json-is-plan",
        "output-in-symlinked-dir",
        "output-is-tokenizer-file",
    ],
)
def test_collisions_name_both_options(case: str, model_with_data: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = model_with_data
    inputs: dict[str, object] = {"MODEL": model}
    outputs: dict[str, object] = {}
    expected = ("-o", "MODEL")
    if case == "output-is-model":
        outputs["-o"] = model_files(model)
    elif case == "output-symlink-to-model":
        (tmp_path / "link.onnx").symlink_to(model)
        outputs["-o"] = model_files(tmp_path / "link.onnx")
    elif case == "output-hardlink-to-model":
        os.link(model, tmp_path / "hard.onnx")
        outputs["-o"] = model_files(tmp_path / "hard.onnx")
    elif case == "output-is-data-file":
        outputs["-o"] = model_files(data)
    elif case == "output-data-twin-is-input-data":
        # -o weights → weights.data; the input reads weights.bin: distinct. But -o X where X.data is the input's
        onnx.save_model(pattern_zoo(), str(model), save_as_external_data=True, location="o.onnx.data", size_threshold=0)
        outputs["-o"] = model_files(tmp_path / "o.onnx")
    elif case == "plan-twin-is-statistics":
        inputs["--statistics"] = tmp_path / "run.npz"
        (tmp_path / "run.npz").write_bytes(b"x")
        outputs["-o"] = plan_files(tmp_path / "run.json")
        expected = ("-o", "--statistics")
    elif case == "report-md-twin-is-calib":
        (tmp_path / "calib.md").write_text("x")
        inputs["--calib-text"] = tmp_path / "calib.md"
        outputs["-o"] = model_files(tmp_path / "out.onnx")
        outputs["--report"] = report_files(tmp_path / "calib.json")
        expected = ("--report", "--calib-text")
    elif case == "curve-json-is-plan":
        outputs["--plan"] = plan_files(tmp_path / "c.json")
        outputs["--curve"] = curve_files(tmp_path / "c")
        expected = ("--curve", "--plan")
    elif case == "output-in-symlinked-dir":
        (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
        outputs["-o"] = model_files(tmp_path / "alias" / "model.onnx")
    else:
        tokenizer = tmp_path / "tok"
        tokenizer.mkdir()
        (tokenizer / "tokenizer.json").write_text("{}")
        inputs["--tokenizer"] = tokenizer
        outputs["-o"] = model_files(tmp_path / "out.onnx")
        outputs["--report"] = report_files(tokenizer / "tokenizer.json")
        expected = ("--report", "--tokenizer")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    with pytest.raises(EspaceError) as info:
        check_distinct_paths(inputs, outputs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert f"{expected[0]} would overwrite" in message and expected[1] in message, message
    assert {p: p.read_bytes() for p in before} == before


def test_an_output_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EspaceError, match="is a directory"):
        check_distinct_paths({}, {"-o": tmp_path})


# ---------------------------------------------------------------------------------------------- output sets in process


def _tags(paths: list[Path]) -> list[str | None]:
    return [p.read_text() if p.exists() else None for p in paths]


def test_set_commits_every_file_and_extras(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    files = [*model_files(out), *report_files(tmp_path / "m.report.json")]
    with atomic_output_set(files) as temporaries:
        save_model(pattern_zoo(), temporaries[0], external_data=True)
        for temporary in temporaries[2:]:
            temporary.write_text("report")
    assert onnx.load(str(out)).graph.node  # the data file came along, under its own name
    assert (tmp_path / "m.onnx.data").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []
    # the next set has no data file: the old one belongs to the previous set only and goes
    with atomic_output_set(files) as temporaries:
        save_model(pattern_zoo(), temporaries[0], external_data=False)
        for temporary in temporaries[2:]:
            temporary.write_text("report 2")
    assert not (tmp_path / "m.onnx.data").exists()
    assert _tags(files[2:]) == ["report 2", "report 2"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failing_block_leaves_the_previous_set(tmp_path: Path) -> None:
    files = [tmp_path / "a.onnx", tmp_path / "a.json", tmp_path / "a.md"]
    with atomic_output_set(files) as temporaries:
        for temporary in temporaries:
            temporary.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_set(files) as temporaries:
        for temporary in temporaries:
            temporary.write_text("new")
        raise KeyboardInterrupt
    assert _tags(files) == ["old"] * 3
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_lock_is_reentrant_but_not_shared(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    with output_lock(out), atomic_output_set([out]) as (temporary,):
        temporary.write_text("x")
    assert out.read_text() == "x"


def test_stale_temporaries_are_cleaned_but_held_ones_kept(tmp_path: Path) -> None:
    stale_graph = tmp_path / ".espace-graph-abc.onnx"
    stale_dir = tmp_path / ".model.onnx.x1.tmp"
    live_graph = tmp_path / ".espace-graph-live.onnx"
    young = tmp_path / ".espace-graph-young.onnx"
    for path in (stale_graph, live_graph, young):
        path.write_bytes(b"graph")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    old = time.time() - 3600
    for path in (stale_graph, live_graph, stale_dir):
        os.utime(path, (old, old))
    fd = hold(live_graph)
    try:
        removed = clean_stale_temporaries(tmp_path, [".espace-graph-*.onnx", ".model.onnx.*.tmp"])
    finally:
        os.close(fd)
    assert removed == 2
    assert not stale_graph.exists() and not stale_dir.exists()
    assert live_graph.exists() and young.exists()


def test_runtime_source_removes_stale_graphs_of_killed_runs(tmp_path: Path) -> None:
    source = tmp_path / "zoo.onnx"
    onnx.save_model(pattern_zoo(), str(source), save_as_external_data=True, location="zoo.data", size_threshold=0)
    leftover = tmp_path / ".espace-graph-killed.onnx"
    leftover.write_bytes(b"x")
    os.utime(leftover, (time.time() - 600, time.time() - 600))
    with runtime_source(load_model(source, load_weights=False)) as path:
        assert isinstance(path, Path) and path.exists()
        assert clean_stale_temporaries(tmp_path, [".espace-graph-*.onnx"], older_than=0) == 0  # ours is held
    assert not leftover.exists()
    assert not list(tmp_path.glob(".espace-graph-*"))


# ---------------------------------------------------------------------------------------------- fault tests

WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from espace_export.errors import EspaceError
    from espace_export.io.models import atomic_output_set

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)  # as the CLI does
    out, tag = Path(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3:  # imported and ready: wait for the test's go-ahead before writing
        while not Path(sys.argv[3]).exists():
            time.sleep(0.01)
    files = [out, out.with_name(out.name + ".data"), out.with_suffix(".report.json"), out.with_suffix(".report.md")]
    try:
        with atomic_output_set(files) as temporaries:
            for temporary in temporaries:
                temporary.write_text(tag)
    except EspaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    """
)


def _set_files(out: Path) -> list[Path]:
    return [out, out.with_name(out.name + ".data"), out.with_suffix(".report.json"), out.with_suffix(".report.md")]


def _writer(out: Path, tag: str, *wait_for: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), tag, *map(str, wait_for)],
        env=environment,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )


def _default_signals() -> None:
    """The writer starts as from a terminal: no signal blocked, and SIGINT not ignored (a shell's background
    job — ``nohup … &`` — ignores SIGINT, a disposition its children inherit, and Python then installs no
    KeyboardInterrupt handler)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(out: Path, marker: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.*.set.tmp/{marker}")):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the writer never reached the hook"
        time.sleep(0.02)


@pytest.fixture()
def previous(tmp_path: Path) -> Path:
    out = tmp_path / "model.onnx"
    assert _writer(out, "old").wait(timeout=60) == 0
    assert _tags(_set_files(out)) == ["old"] * 4
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_before_the_commit_keeps_the_previous_set(signum: int, previous: Path) -> None:
    process = _writer(previous, "new", ESPACE_TEST_PAUSE_BEFORE_RENAME="60")
    _wait_for(previous, ".complete", process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert _tags(_set_files(previous)) == ["old"] * 4
    if signum != signal.SIGKILL:
        assert not list(previous.parent.glob(".*.tmp")), "an interrupted run removes its staging"
    with output_lock(previous):  # the next writer settles what a killed one left
        pass
    assert not list(previous.parent.glob(".*.tmp"))
    assert _tags(_set_files(previous)) == ["old"] * 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_commit_is_held_until_the_set_flipped(signum: int, previous: Path) -> None:
    process = _writer(previous, "new", ESPACE_TEST_PAUSE_MID_COMMIT="5")
    _wait_for(previous, ".midway", process)
    process.send_signal(signum)
    process.communicate(timeout=60)
    assert process.returncode != 0  # the signal still stops the run, after the commit
    assert _tags(_set_files(previous)) == ["new"] * 4
    assert not list(previous.parent.glob(".*.tmp"))


def test_sigkill_during_the_commit_is_rolled_forward(previous: Path) -> None:
    process = _writer(previous, "new", ESPACE_TEST_PAUSE_MID_COMMIT="60")
    _wait_for(previous, ".midway", process)
    process.kill()
    process.communicate(timeout=60)
    tags = _tags(_set_files(previous))
    assert tags[0] == "old", "the model moves last"
    with output_lock(previous):
        pass
    assert _tags(_set_files(previous)) == ["new"] * 4
    assert not list(previous.parent.glob(".*.tmp"))


def test_a_concurrent_writer_is_refused_and_the_first_set_wins(previous: Path) -> None:
    go = previous.parent / "go"
    second = _writer(previous, "second", go)  # started now, so its imports are done when it is let go
    first = _writer(previous, "first", ESPACE_TEST_PAUSE_BEFORE_RENAME="8")
    _wait_for(previous, ".complete", first)
    go.touch()
    _, err = second.communicate(timeout=60)
    assert first.poll() is None, "the first writer was still holding its output while the second tried"
    assert second.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "is being written" in lines[0], err
    assert first.wait(timeout=60) == 0
    assert _tags(_set_files(previous)) == ["first"] * 4


@pytest.fixture()
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_and_keeps_the_previous_set(small_disk: Path) -> None:
    files = [small_disk / "m.onnx", small_disk / "m.report.json"]
    with atomic_output_set(files) as temporaries:
        for temporary in temporaries:
            temporary.write_text("old")
    with pytest.raises(EspaceError, match="no space left") as info, atomic_output_set(files) as temporaries:
        temporaries[1].write_text("new")
        temporaries[0].write_bytes(os.urandom(2 * 2**20))
    assert "\n" not in str(info.value)
    assert _tags(files) == ["old", "old"]
    assert sorted(p.name for p in small_disk.iterdir()) == [
        "m.onnx",
        "m.report.json",
    ]  # the lock file goes with its run


# ---------------------------------------------------------------------------------------------- the real compress


def _consistent(out: Path) -> float:
    """The compressed model on disk and the report beside it describe the same model (its parameter count);
    returns the ratio the report says was asked for."""
    import json

    from graph_passes.find import parameter_count

    report = json.loads(out.with_suffix(".report.json").read_text())
    markdown = out.with_suffix(".report.md").read_text()
    assert parameter_count(load_model(out)) == report["total_params_after"], "the model and its report disagree"
    assert f"{report['total_params_after']:,}" in markdown or str(report["total_params_after"]) in markdown
    return float(report["ratio_requested"])


def _compress(model: Path, out: Path, ratio: str, **env: str) -> subprocess.Popen[bytes]:
    arguments = [str(model), "-o", str(out), "--ratio", ratio, "--num-batches", "2", "--seq-len", "8"]
    return subprocess.Popen(
        [sys.executable, "-m", "espace_export", *arguments, "--min-rank", "4", "-q"],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )


@pytest.mark.slow
def test_compressed_model_and_report_flip_as_one_set(sample_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before every commit's renames (where a kill leaves the files as they are) the model and the report
    on disk describe one model, and a SIGKILL mid-commit leaves one whole set after recovery. With the
    model and the report committed one after the other, the pause before the second commit found the new
    model beside the old report."""
    source = tmp_path / "llama.onnx"
    source.write_bytes(sample_model("llama", "torchscript", hidden=32, layers=1).read_bytes())
    out = tmp_path / "out" / "model.espace.onnx"
    assert _compress(source, out, "0.5").wait(timeout=300) == 0
    assert _consistent(out) == 0.5
    for kill, ratio in ((False, "0.25"), (True, "0.75")):
        process = _compress(
            source, out, ratio, ESPACE_TEST_PAUSE_BEFORE_RENAME="1.5", ESPACE_TEST_PAUSE_MID_COMMIT="1.5"
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            markers = {str(p) for p in out.parent.glob(".*.tmp/.complete")} | {
                str(p) for p in out.parent.glob(".*.tmp/.midway")
            }
            for marker in sorted(markers - seen):  # the writer is paused here
                seen.add(marker)
                if marker.endswith(".complete"):  # before a commit's renames: what a kill here leaves
                    _consistent(out)
                elif kill:  # mid-commit (the model not yet moved): the next writer rolls it forward
                    process.kill()
            time.sleep(0.05)
        process.communicate(timeout=60)
        assert seen, "the writer never paused at a commit"
        if kill:
            assert process.returncode == -signal.SIGKILL
            with output_lock(out):  # the next writer rolls the begun commit forward
                pass
        else:
            assert process.returncode == 0
        assert _consistent(out) == float(ratio)
        assert not list(out.parent.glob(".*.tmp"))
