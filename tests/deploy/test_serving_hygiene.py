"""Triton repositories a server running as another user can read, assembled where a polling server
never sees them, and replaced version by version."""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx
import pytest

from espace_export.deploy.serving import write_triton_repo
from espace_export.errors import EspaceError
from espace_export.io.models import save_model
from tests._models import compress_tiny, tiny_decoder


@pytest.fixture()
def compressed_path(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.espace.onnx"
    path.parent.mkdir()
    onnx.save(compress_tiny(tiny_decoder()), str(path))
    return path


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_model_folders_and_data_files_follow_the_umask(mask: int, tmp_path: Path, compressed_path: Path) -> None:
    external = tmp_path / "src" / "external.onnx"
    save_model(onnx.load(str(compressed_path)), external, external_data=True)
    previous = os.umask(mask)
    try:
        model_dir = write_triton_repo(tmp_path / "repo", external, name="tiny")
    finally:
        os.umask(previous)
    found = modes(model_dir)
    assert "1/model.onnx.data" in found
    for relative, mode in found.items():
        wanted = (0o777 if (model_dir / relative).is_dir() else 0o666) & ~mask
        assert mode == wanted, (relative, oct(mode), oct(wanted))


def test_a_new_version_keeps_the_others(tmp_path: Path, compressed_path: Path) -> None:
    repo = tmp_path / "repo"
    write_triton_repo(repo, compressed_path, name="tiny")
    first = (repo / "tiny" / "1" / "model.onnx").read_bytes()
    write_triton_repo(repo, compressed_path, name="tiny", version=2, overwrite=True)
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == first
    write_triton_repo(repo, compressed_path, name="tiny", version=1, overwrite=True)  # replaces 1, keeps 2
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2", "config.pbtxt"]
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_staging_is_beside_the_repository_and_stale_staging_is_cleaned(tmp_path: Path, compressed_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    killed = tmp_path / ".repo.tiny.abc123.tmp"  # what a SIGKILLed build leaves
    (killed / "1").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(killed, (old, old))
    seen: list[list[str]] = []
    import espace_export.deploy.serving as serving

    original_swap = serving._swap_in

    def spy(staging: Path, target: Path, aside: Path | None = None) -> None:
        seen.append(sorted(p.name for p in repo.iterdir()))
        assert staging.parent == tmp_path
        original_swap(staging, target, aside)

    serving._swap_in = spy  # type: ignore[assignment]
    try:
        write_triton_repo(repo, compressed_path, name="tiny")
    finally:
        serving._swap_in = original_swap  # type: ignore[assignment]
    assert seen == [[]], "the server's repository saw nothing before the model moved in"
    assert not killed.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"name": "../escape"}, "model name"), ({"name": ".hidden"}, "model name"), ({"version": 0}, "version")],
)
def test_rejected_calls_create_nothing(kwargs: dict, message: str, tmp_path: Path, compressed_path: Path) -> None:
    repo = tmp_path / "new-repo"
    with pytest.raises(EspaceError, match=message):
        write_triton_repo(repo, compressed_path, **kwargs)
    assert not repo.exists()


def test_a_garbage_model_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not onnx at all" * 10)
    with pytest.raises(EspaceError, match="not a readable ONNX model") as info:
        write_triton_repo(tmp_path / "repo", garbage)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "repo").exists()
