"""Load ONNX models with clear errors, and write outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper

from espace_export.errors import EspaceError
from graph_passes.find import EXTERNAL_DIR_KEY, external_data_dir

# Tests set this (seconds) to hold a finished temporary output before its rename, to signal the run there.
_PAUSE_ENV = "ESPACE_TEST_PAUSE_BEFORE_RENAME"
# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_model(path: str | os.PathLike[str], *, load_weights: bool = True) -> onnx.ModelProto:
    """Read and check an ONNX model.

    With ``load_weights=False`` external data stays on disk: the graph is loaded, each external tensor is
    checked (file present, inside the model's directory, long enough) without being read, and the
    directory is recorded so single weights can be read on demand (:func:`graph_passes.weight_matrix`)
    and the rest at save time. That keeps a 100 GB model's weights out of this process.

    Raises :class:`EspaceError` for a missing path, a file that is not ONNX, a truncated model or
    missing/truncated external data, and a model that fails ``onnx.checker`` (run by path, so >2 GB works).
    """
    path = Path(path)
    if not path.exists():
        raise EspaceError(f"model not found: {path}", "check the path to the .onnx file")
    if not path.is_file():
        raise EspaceError(f"{path} is not a file", "pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
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
    if not load_weights:
        check_external_data(model, path.parent)
        if any(_is_external(t) for t in _tensors(model)):
            entry = model.metadata_props.add()
            entry.key, entry.value = EXTERNAL_DIR_KEY, str(path.parent.resolve())
    check_model(path)
    return model


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return tensors


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Each external tensor's file exists inside ``base_dir`` and holds its bytes (nothing is read)."""
    base = base_dir.resolve()
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if not _is_external(tensor):
            continue
        entries = _external_entries(tensor)
        location = entries.get("location", "")
        target = (base / location).resolve()
        if not location or base not in target.parents:
            raise EspaceError(
                f"external data of tensor '{tensor.name}' points outside the model directory ({location!r})",
                "re-save the model with relative external data locations",
            )
        if location not in sizes:
            if not target.is_file():
                raise EspaceError(
                    f"external data file {location} of the model is missing",
                    "keep the .onnx file next to its external data file",
                )
            sizes[location] = target.stat().st_size
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        needed = offset + int(length) if length is not None else offset + 1
        if needed > sizes[location]:
            raise EspaceError(
                f"external data file {location} is truncated ({sizes[location]} bytes, tensor '{tensor.name}' "
                f"needs {needed})",
                "copy the data file again, it is incomplete",
            )


def load_remaining_weights(model: onnx.ModelProto) -> None:
    """Read the external tensors still on disk into the model and forget where they came from."""
    base = external_data_dir(model)
    if base:
        onnx.external_data_helper.load_external_data_for_model(model, base)
    _drop_loader_metadata(model)


def _drop_loader_metadata(model: onnx.ModelProto) -> None:
    """Remove the loader's bookkeeping entry (never part of a model we hand on)."""
    keep = [p for p in model.metadata_props if p.key != EXTERNAL_DIR_KEY]
    if len(keep) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(keep)


def read_arrays(path: str | os.PathLike[str], what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz``, read without unpickling; a file that cannot be read (not a zip, truncated,
    pickled objects) is an :class:`EspaceError` naming ``what``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as exc:  # zipfile/ValueError/OSError all mean the same to the user
        raise EspaceError(f"cannot read {what} {path}: {exc}", fix) from None


def check_model(path: str | os.PathLike[str]) -> None:
    """The model's structure, checked as ONNX Runtime will take it, as an :class:`EspaceError`.

    ``onnx.checker`` runs by path (works past the 2 GB protobuf limit). Operators ONNX does not define but
    ONNX Runtime registers in the default domain (``SimplifiedLayerNormalization``, ``RotaryEmbedding``, …,
    written by onnxruntime-genai's builder) are accepted: the rest of the graph is then checked with those
    nodes moved to a private domain. Contrib ops in other domains (``com.microsoft``) the checker already
    leaves to the runtime. The message says what is wrong: an unreadable file, an operator no runtime
    knows, or an inconsistent graph.
    """
    try:
        onnx.checker.check_model(str(path), full_check=False)
        return
    except Exception as exc:
        reason = _first_line(exc)
    if "No Op registered for" not in reason:
        raise EspaceError(*_checker_failure(path, reason)) from None
    model = onnx.load(str(path), load_external_data=False)  # the graph only: small whatever the weights
    unknown = sorted(runtime_only_ops(model))
    strangers = [op for op in unknown if op not in runtime_default_domain_ops()]
    if strangers:
        raise EspaceError(
            f"{path} uses operator {strangers[0]!r} (default domain), which neither ONNX nor ONNX Runtime "
            f"{_ort_version()} defines",
            "re-export with standard ONNX operators, or upgrade onnxruntime if a newer one has it",
        )
    _move_to_private_domain(model, set(unknown))
    _forget_external_data(model)  # checked by check_external_data; in memory the checker would look in the cwd
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise EspaceError(*_checker_failure(path, _first_line(exc))) from None


_PRIVATE_DOMAIN = "espace.checker.onnxruntime"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _checker_failure(path: str | os.PathLike[str], reason: str) -> tuple[str, str]:
    """Problem and fix for a checker failure, by its cause."""
    if "parse" in reason.lower() or "protobuf" in reason.lower():
        return (
            f"{path} is not a readable ONNX model ({reason[:160]})",
            "the file may be truncated or not ONNX: copy it again or re-export it",
        )
    return (
        f"{path} is not a valid ONNX graph (onnx.checker: {reason[:200]})",
        "the exporter wrote an inconsistent graph: re-export the model (or report it to the exporter)",
    )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                yield from _all_nodes(sub)


def runtime_only_ops(model: onnx.ModelProto) -> set[str]:
    """Default-domain operator types of ``model`` (subgraphs included) that ONNX does not define at the
    model's opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    unknown = set()
    for node in _all_nodes(model.graph):
        if node.domain in ("", "ai.onnx"):
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except Exception:  # SchemaError: no such operator at this opset
                unknown.add(node.op_type)
    return unknown


def runtime_default_domain_ops() -> frozenset[str]:
    """Operators the installed ONNX Runtime has kernels for in the default domain (any provider)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        return frozenset(k.op_name for k in ort_state.get_all_opkernel_def() if k.domain in ("", "ai.onnx"))
    except Exception:  # no onnxruntime, or a build without the registry: trust only ONNX
        return frozenset()


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except Exception:
        return "(not installed)"


def _forget_external_data(model: onnx.ModelProto) -> None:
    for tensor in _tensors(model):
        if _is_external(tensor):
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            del tensor.dims[:]
            tensor.dims.append(0)


def _move_to_private_domain(model: onnx.ModelProto, ops: set[str]) -> None:
    for node in _all_nodes(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in ops:
            node.domain = _PRIVATE_DOMAIN
    if ops:
        model.opset_import.append(onnx.helper.make_opsetid(_PRIVATE_DOMAIN, 1))


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, without serializing; past 2 GB protobuf cannot even size it, which says enough."""
    try:
        return int(model.ByteSize())
    except Exception:  # EncodeError: the message is over the protobuf limit
        return PROTOBUF_LIMIT + 1


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


def external_initializers(model: onnx.ModelProto) -> tuple[list[str], list[np.ndarray]]:
    """Read-only memory maps of the initializers still on disk (none when all weights are in memory).

    ONNX Runtime can take them through ``SessionOptions.add_external_initializers`` and run on the
    mapped file pages directly: no copy in this process, nothing written. (A temporary graph beside
    symbolic links does not work: ONNX Runtime resolves links and refuses data outside the model's
    directory.)
    """
    base = external_data_dir(model)
    if not base:
        return [], []
    names, arrays = [], []
    for tensor in model.graph.initializer:
        if not _is_external(tensor):
            continue
        entries = _external_entries(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        arrays.append(
            np.memmap(Path(base) / entries["location"], dtype=dtype, mode="r", offset=int(entries.get("offset", 0)),
                      shape=shape) if int(np.prod(shape)) > 0 else np.zeros(shape, dtype=dtype)
        )  # fmt: skip
        names.append(tensor.name)
    return names, arrays


@contextlib.contextmanager
def runtime_source(model: onnx.ModelProto) -> Iterator[onnx.ModelProto | Path]:
    """What to hand ONNX Runtime for ``model``, for the duration of the block.

    A model whose weights are still on disk becomes a hidden temporary ``.onnx`` of its graph written
    beside the original data files (relative locations resolve, ONNX Runtime reads the weights once, as
    for the original model) and removed when the block ends — a session made inside keeps working. If
    that directory is not writable, the proto itself is returned and :func:`espace_export.build.ort_session`
    maps the weights instead (no write, but the runtime then holds the mapped pages and a copy).
    """
    base = external_data_dir(model)
    if not base:
        yield model
        return
    try:
        handle, name = tempfile.mkstemp(prefix=".espace-graph-", suffix=".onnx", dir=base)
    except OSError:
        yield model
        return
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(without_loader_metadata(model).SerializeToString())
        yield path
    finally:
        path.unlink(missing_ok=True)


def without_loader_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the loader's bookkeeping: a copy when there is some (small: its weights are still
    on disk), the model itself otherwise."""
    if not external_data_dir(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _drop_loader_metadata(copy)
    return copy


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
        pause = os.environ.get(_PAUSE_ENV)
        if pause:  # fault injection for tests: a window in which everything is written but nothing renamed
            (workdir / ".complete").touch()
            time.sleep(float(pause))
            (workdir / ".complete").unlink()
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
    pair can be moved together; it is used when asked, when the model came with external data, or when
    it would not fit in protobuf.
    """
    path = Path(path)
    had_external_data = bool(external_data_dir(model))
    load_remaining_weights(model)
    if external_data is None:
        external_data = had_external_data or model_bytes(model) > PROTOBUF_LIMIT
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
