"""Outputs create their missing parent directories, and only when they are committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output, check_writable


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_writable_accepts_a_missing_directory_without_creating_it(tmp_path: Path) -> None:
    target = tmp_path / "build" / "sub" / "model.onnx"
    assert check_writable(target) == target
    assert tree(tmp_path) == []


def test_check_writable_refuses_a_directory_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_text("x")
    with pytest.raises(EspaceError, match="is a file"):
        check_writable(tmp_path / "model.onnx" / "sub" / "out.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_writable_refuses_a_read_only_ancestor(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(EspaceError, match="permission denied"):
        check_writable(locked / "new" / "out.onnx")


def test_atomic_output_creates_parents_on_commit(tmp_path: Path) -> None:
    target = tmp_path / "build" / "sub" / "model.onnx"
    with atomic_output(target) as tmp:
        assert not (tmp_path / "build").exists()  # nothing is created while the run may still fail
        tmp.write_text("model")
        (tmp.parent / "model.onnx.data").write_text("weights")  # an external data file travels with it
    assert tree(tmp_path) == ["build", "build/sub", "build/sub/model.onnx", "build/sub/model.onnx.data"]
    assert target.read_text() == "model"


def test_atomic_output_leaves_nothing_when_the_run_fails(tmp_path: Path) -> None:
    target = tmp_path / "build" / "sub" / "model.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_text("half a model")
        raise KeyboardInterrupt
    assert tree(tmp_path) == []


def test_atomic_output_removes_the_directories_it_made_when_the_commit_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    target = tmp_path / "build" / "sub" / "model.onnx"
    with pytest.raises(OSError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_text("model")
        monkeypatch.setattr(os, "replace", refuse)
    assert tree(tmp_path) == []


def test_relative_output_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_output(Path("build/model.onnx")) as tmp:
        tmp.write_text("m")
    with atomic_output(Path("plain.onnx")) as tmp:
        tmp.write_text("p")
    assert tree(tmp_path) == ["build", "build/model.onnx", "plain.onnx"]
