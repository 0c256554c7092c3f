"""Load ONNX models with clear errors, and write outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx

from espace_export.errors import EspaceError

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX model (with its external data).

    Raises :class:`EspaceError` for a missing path, a file that is not ONNX, a truncated model or
    missing external data, and a model that fails ``onnx.checker`` (run by path, so >2 GB works).
    """
    path = Path(path)
    if not path.exists():
        raise EspaceError(f"model not found: {path}", "check the path to the .onnx file")
    if not path.is_file():
        raise EspaceError(f"{path} is not a file", "pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as exc:
        raise EspaceError(
            f"external data of {path} is missing ({Path(str(exc.filename or exc)).name})",
            "keep the .onnx file next to its external data file",
        ) from None
    except Exception as exc:  # DecodeError, ValueError, OSError: all "this is not a readable model"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EspaceError(
            f"{path} is not a valid ONNX model ({reason[:160]})",
            "the file may be truncated or not ONNX: re-export it (torch.onnx.export) or copy it again",
        ) from None
    if len(model.graph.node) == 0:
        raise EspaceError(f"{path} has an empty graph", "re-export the model")
    check_model(path)
    return model


def check_model(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` by path (works past the 2 GB protobuf limit), as an :class:`EspaceError`."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EspaceError(
            f"{path} fails onnx.checker: {reason[:200]}",
            "the file may be truncated or corrupted: re-export the model",
        ) from None


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, without serializing (which fails past 2 GB)."""
    return int(model.ByteSize())


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any long work, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise EspaceError(f"output path {path} is a directory", "pass a file name such as model.espace.onnx")
    if not parent.is_dir():
        raise EspaceError(f"output directory {parent} does not exist", f"create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EspaceError(f"cannot write {path}: permission denied", "choose another output path with -o")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move everything written there into place.

    Files written next to the temporary path (an external data file) move too, before the model
    file itself, so a reader never sees a model whose data is not there yet. On any exception
    (including KeyboardInterrupt) the temporary files are removed and an existing output is untouched.
    """
    path = Path(path)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield workdir / path.name
        main = workdir / path.name
        if not main.exists():
            raise RuntimeError(f"nothing was written to {main}")
        with _signals_deferred():  # the data file and the model move together, or not at all
            for extra in sorted(workdir.iterdir()):
                if extra != main:
                    os.replace(extra, path.parent / extra.name)
            os.replace(main, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (main thread, POSIX) until the block is done; they are delivered right after."""
    blockable = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not blockable:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` (no atomicity here: see :func:`atomic_output`).

    External data goes to one file ``<name>.data`` beside the model, with a relative location so the
    pair can be moved together; it is used when asked, or when the model would not fit in protobuf.
    """
    path = Path(path)
    if external_data is None:
        external_data = model_bytes(model) > PROTOBUF_LIMIT
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
