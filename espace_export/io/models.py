"""Load ONNX models with clear errors, and write outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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
        model = onnx.load(str(path), load_external_data=False)
        check_gemm_weights(model, path)
        check_external_data(model, path.parent)  # before anything is read: locations, offsets, lengths
        if load_weights:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except EspaceError:
        raise
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
    if not load_weights and any(_is_external(t) for t in _tensors(model)):
        entry = model.metadata_props.add()
        entry.key, entry.value = EXTERNAL_DIR_KEY, str(path.parent.resolve())
    check_model(path)
    return model


def check_gemm_weights(model: onnx.ModelProto, path: PathLike) -> None:
    """A MatMul/Gemm weight with a zero-size dimension is refused (the layer computes nothing, and
    every ratio of its sizes would divide by zero)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            dims = shapes.get(node.input[1])
            if dims is not None and 0 in dims:
                raise EspaceError(
                    f"{path}: weight '{node.input[1]}' of {node.op_type} '{node.name or node.output[0]}' is empty "
                    f"(shape {list(dims)})",
                    "re-export the model with its real weights (an empty weight computes nothing)",
                )


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
        if "\0" in location:
            raise EspaceError(
                f"external data location of tensor '{tensor.name}' holds a NUL byte ({location!r})",
                "the model file is corrupted: re-save it with relative external data locations",
            )
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
        offset = _external_number(tensor, entries, "offset", 0) or 0
        length = _external_number(tensor, entries, "length", None)
        expected = _tensor_bytes(tensor)
        if length is not None and expected is not None and length != expected:
            raise EspaceError(
                f"external data of tensor '{tensor.name}' is {length} bytes, its shape and type need {expected}",
                "the model file is corrupted: re-export it or re-save it with onnx.save_model",
            )
        needed = offset + length if length is not None else offset + 1
        if needed > sizes[location]:
            raise EspaceError(
                f"external data file {location} is truncated ({sizes[location]} bytes, tensor '{tensor.name}' "
                f"needs {needed})",
                "copy the data file again, it is incomplete",
            )


_PACKED_HALF_BYTE = {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
}


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's values take (None for strings and types without a fixed size)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # unknown or undefined type: the checker reports it
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return None
    if tensor.data_type in _PACKED_HALF_BYTE:
        return (int(np.prod(tensor.dims, dtype=np.int64)) + 1) // 2
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _external_number(tensor: onnx.TensorProto, entries: Mapping[str, str], key: str, default: int | None) -> int | None:
    """An external-data ``offset`` or ``length``: a non-negative decimal integer (they are strings)."""
    text = entries.get(key)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise EspaceError(
            f"external data {key} of tensor '{tensor.name}' is {text[:40]!r}, not a byte count",
            "the model file is corrupted: re-export it or re-save it with onnx.save_model",
        )
    return int(text)


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


def existing_ancestor(directory: Path) -> Path:
    """``directory`` itself if it exists, else its nearest ancestor that does (``.`` for a relative path)."""
    directory = directory if str(directory) else Path(".")
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any long work, when ``path`` cannot be written.

    A missing parent directory is fine when it can be created (as ``mkdir -p`` would): it is created by
    :func:`atomic_output` when the output is committed, so a run that fails before then leaves no
    directory behind. Nothing is created here.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise EspaceError(f"output path {path} is a directory", "pass a file name such as model.espace.onnx")
    base = existing_ancestor(parent)
    if not base.is_dir():
        raise EspaceError(
            f"cannot create output directory {parent}: {base} is a file", "choose another output path with -o"
        )
    if not os.access(base, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
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
    that directory is not writable, the proto itself is returned and :func:`espace_export.runtime.ort_session`
    maps the weights instead (no write, but the runtime then holds the mapped pages and a copy).
    """
    base = external_data_dir(model)
    if not base:
        yield model
        return
    clean_stale_temporaries(base, [".espace-graph-*.onnx"])
    try:
        handle, name = tempfile.mkstemp(prefix=".espace-graph-", suffix=".onnx", dir=base)
    except OSError:
        yield model
        return
    path = Path(name)
    fcntl.flock(handle, fcntl.LOCK_SH)  # in use: clean_stale_temporaries leaves it alone
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(without_loader_metadata(model).SerializeToString())
            file.flush()
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

    Missing parent directories of ``path`` are created only when the output is committed, so a failed
    run leaves none behind: until then the temporary files live in the nearest existing ancestor (the
    same filesystem as the directories created under it, so the final renames stay atomic).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    staging = existing_ancestor(parent)
    clean_stale_temporaries(staging, [f".{glob.escape(path.name)}.*.tmp"])
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=staging))
    held = hold(workdir)  # in use: clean_stale_temporaries leaves it alone
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
            created = _make_parents(parent)
            try:
                for extra in sorted(workdir.iterdir()):
                    if extra != main:
                        os.replace(extra, parent / extra.name)
                os.replace(main, path)
            except BaseException:
                for directory in reversed(created):  # innermost first; only those still empty go
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(held)


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories it created, outermost first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
    for d in missing:
        with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
            d.mkdir()
    return missing


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (main thread) until the block is done; they are delivered right after.

    The Python-level handlers are swapped for one that only records the signal: masking the main
    thread (pthread_sigmask) is not enough, since the kernel then hands the signal to another thread
    (BLAS, ONNX Runtime pools) and Python still runs its handler in the main thread mid-block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for pending in dict.fromkeys(received):
            signal.raise_signal(pending)


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
        data = path.with_name(f"{path.name}.data")
        if data.is_file():  # onnx writes it through a temporary file: 0600, whatever the umask
            follow_umask(data, directory=False)
    else:
        onnx.save_model(model, str(path))


# ---------------------------------------------------------------------------------------------- inputs vs outputs

PathLike = str | os.PathLike[str]
PathSpec = PathLike | Sequence[PathLike] | None


def model_files(path: PathLike) -> tuple[Path, ...]:
    """A model output: ``path`` and the ``path.data`` external-data file :func:`save_model` may write."""
    path = Path(path)
    return path, path.with_name(path.name + ".data")


def report_files(path: PathLike) -> tuple[Path, ...]:
    """A JSON report and its Markdown twin."""
    path = Path(path)
    return path, path.with_suffix(".md")


def plan_files(path: PathLike) -> tuple[Path, ...]:
    """A plan: the JSON and its ``.npz`` factors."""
    path = Path(path)
    return path, path.with_suffix(".npz")


def curve_files(path: PathLike) -> tuple[Path, ...]:
    """``--curve PATH``: ``PATH.json`` and ``PATH.png``."""
    path = Path(path)
    return path.with_suffix(".json"), path.with_suffix(".png")


def profile_files(path: PathLike) -> tuple[Path, ...]:
    """A profile report: JSON, Markdown twin and PNG chart."""
    path = Path(path)
    return path, path.with_suffix(".md"), path.with_suffix(".png")


def external_data_files(path: PathLike) -> tuple[Path, ...]:
    """The external data files an ONNX model at ``path`` reads (resolved; nothing when it has none or
    cannot be parsed — :func:`load_model` reports that later, with its own message)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: the loader that runs next says so in one line
        return ()
    base = path.resolve().parent
    files: dict[str, Path] = {}
    for tensor in _tensors(model):
        if _is_external(tensor):
            location = _external_entries(tensor).get("location", "")
            if location and "\0" not in location and location not in files:
                files[location] = (base / location).resolve()
    return tuple(files.values())


def _expand(spec: PathSpec) -> list[Path]:
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        return [Path(spec)]
    return [Path(p) for p in spec]


def _identities(path: Path) -> set[tuple[object, ...]]:
    """What makes two paths one file: the resolved path, and (device, inode) when it exists (hard links)."""
    keys: set[tuple[object, ...]] = {("path", os.path.realpath(path))}
    with contextlib.suppress(OSError):
        stat = path.stat()
        keys.add(("inode", stat.st_dev, stat.st_ino))
    return keys


def _input_files(path: Path) -> list[Path]:
    """An input and what comes with it: a model's external data files, a directory's files (a tokenizer)."""
    if path.is_dir():
        with contextlib.suppress(OSError):
            return [path] + [child for child in path.iterdir() if child.is_file()]
        return [path]
    if path.suffix == ".onnx" and path.is_file():
        return [path, *external_data_files(path)]
    return [path]


def check_distinct_paths(inputs: Mapping[str, PathSpec], outputs: Mapping[str, PathSpec]) -> None:
    """Refuse, before any work, an output that would overwrite an input or another output.

    ``inputs`` and ``outputs`` map an option name as the user typed it (``"MODEL"``, ``"--statistics"``,
    ``"-o"``) to a path, a sequence of paths (a derived set: :func:`model_files`, :func:`report_files`,
    :func:`plan_files`, :func:`curve_files`, :func:`profile_files`) or None (not given). Each path is
    compared by its resolved form (symbolic links followed) and, when it exists, by device and inode
    (hard links); an input ``.onnx`` brings its external data files along, an input directory its files.

    Raises:
        EspaceError: naming the two options that collide.
    """
    seen: list[tuple[str, str, Path, set[tuple[object, ...]]]] = []
    for option, spec in inputs.items():
        for given in _expand(spec):
            seen += [("input", option, path, _identities(path)) for path in _input_files(given)]
    for option, spec in outputs.items():
        mine = []
        for path in _expand(spec):
            if path.is_dir():
                raise EspaceError(f"{option} {path} is a directory", f"pass a file name to {option}")
            keys = _identities(path)
            for role, other, other_path, other_keys in seen:
                if keys & other_keys:
                    shown = str(other_path) if other_path.name == path.name else f"{other_path}, as {path}"
                    raise EspaceError(
                        f"{option} would overwrite the {role} {other} ({shown})", f"choose another path for {option}"
                    )
            mine.append(("output", option, path, keys))
        seen += mine


# ---------------------------------------------------------------------------------------------- output sets

# Tests set this (seconds) to hold a commit after its first rename, to signal or kill the run there.
_PAUSE_MID_COMMIT_ENV = "ESPACE_TEST_PAUSE_MID_COMMIT"
_SET_SUFFIX = ".set.tmp"
_MANIFEST = "manifest.json"
_COMMITTED = "COMMITTED"
# A hidden temporary younger than this is never taken for a stale one (it may be being set up).
STALE_AFTER_S = 5.0
_held_locks: dict[str, tuple[int, int]] = {}  # lock file → (descriptor, depth): re-entrant in one process
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def lock_file(primary: PathLike) -> Path:
    """The lock beside an output set's primary file: ``.NAME.lock`` (kept; removing lock files races)."""
    primary = Path(primary)
    return primary.with_name(f".{primary.name}.lock")


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux: /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # not thread-safe, hence the /proc path first
    os.umask(mask)
    return mask


def follow_umask(path: PathLike, *, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (mkstemp makes 0600, mkdtemp 0700)."""
    path = Path(path)
    is_dir = path.is_dir() if directory is None else directory
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


@contextlib.contextmanager
def output_lock(primary: PathLike) -> Iterator[Path]:
    """Hold the writer's lock of the output set whose primary file is ``primary``, for the block.

    Take it when a run starts (before hours of work) so a second run writing the same ``-o`` stops at
    once instead of racing the first; :func:`atomic_output_set` takes it too (re-entrant in one process).
    On entry, what a killed writer left is settled: a commit it had begun is finished, staging it had
    not committed is removed.

    Raises:
        EspaceError: another process holds the lock.
    """
    lock = lock_file(primary)
    key = os.path.realpath(lock)
    if key in _held_locks:
        fd, depth = _held_locks[key]
        _held_locks[key] = (fd, depth + 1)
        try:
            yield lock
        finally:
            fd, depth = _held_locks[key]
            _held_locks[key] = (fd, depth - 1)
        return
    created = [] if lock.parent.exists() else _make_parents(lock.parent)  # -o build/sub/model.onnx
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        _remove_created(created, lock)
        raise EspaceError(f"cannot create the lock {lock}: {exc.strerror}", "choose a writable output path") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = ""
        with contextlib.suppress(OSError, ValueError):
            owner = f" by process {int(os.pread(fd, 32, 0).decode().strip())}"
        os.close(fd)
        raise EspaceError(
            f"{primary} is being written{owner} (lock {lock.name} is held)",
            "wait for that run to finish, or choose another output path with -o",
        ) from None
    _held_locks[key] = (fd, 1)
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        recover_output_set(primary)
        yield lock
    finally:
        del _held_locks[key]
        # the lock file goes with the run, so an output directory holds only outputs (a writer that opened
        # it meanwhile still excludes a third one for as long as it holds it: flock is on the open file)
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if created and not Path(primary).exists():  # a failed run leaves no directory behind
            _remove_created(created, lock)


def _remove_created(created: list[Path], lock: Path) -> None:
    """Undo :func:`_make_parents` for a run that wrote nothing: the lock file, then the emptied directories."""
    with contextlib.suppress(OSError):
        lock.unlink()
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _staging_dirs(primary: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(
            p
            for p in primary.parent.iterdir()
            if p.name.startswith(f".{primary.name}.") and p.name.endswith(_SET_SUFFIX) and p.is_dir()
        )
    return []


def recover_output_set(primary: PathLike) -> None:
    """Settle what a killed writer of ``primary``'s set left (call with :func:`output_lock` held).

    A staging folder whose commit had begun (its ``COMMITTED`` marker is written, after every file was
    complete and synced) is rolled forward: its remaining files are moved in, the primary last, so the
    set is whole again — the killed run's, complete. Staging that never reached its commit is removed:
    the previous set was never touched.
    """
    primary = Path(primary)
    for staging in _staging_dirs(primary):
        manifest = None
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((staging / _MANIFEST).read_text(encoding="utf-8"))
        if manifest and (staging / _COMMITTED).exists():
            _commit(manifest, pause=False)
        for other in (manifest or {}).get("staging", []):
            shutil.rmtree(other, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _commit(manifest: Mapping[str, Any], *, pause: bool) -> None:
    """Move the staged files into place in the manifest's order (primary last), then remove the declared
    files this set does not have. Each step is idempotent, so a recovery can repeat a half-done commit."""
    moves = [(Path(src), Path(dst)) for src, dst in manifest["moves"]]
    for index, (source, target) in enumerate(moves):
        if source.exists():
            os.replace(source, target)
        if pause and index == 0 and len(moves) > 1 and os.environ.get(_PAUSE_MID_COMMIT_ENV):
            (Path(manifest["staging"][0]) / ".midway").touch()
            time.sleep(float(os.environ[_PAUSE_MID_COMMIT_ENV]))
    for stale in manifest["absent"]:
        Path(stale).unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_set(paths: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Write several files as one unit: yield a temporary path for each; commit them all or none.

    ``paths[0]`` is the primary file (the model): it is moved in *last*, so whoever sees the new primary
    sees its whole set (report twins, plan factors, data file). Files written beside the primary's
    temporary path that were not declared (an external data file) move with it, before it. A declared
    file the block did not write belongs to the previous set only and is removed after the primary moved.

    Guarantees: the block runs under :func:`output_lock` (a concurrent writer of the same primary is
    refused); nothing is moved until every file is written and synced; SIGINT/SIGTERM are held while
    the files move, so the set flips as a whole; an exception (KeyboardInterrupt included) removes the
    temporaries and leaves the previous set untouched; a full disk is an :class:`EspaceError`. A SIGKILL
    cannot be held: killed before the commit, the previous set is untouched and the next writer removes
    the staging; killed during the few renames of the commit, the next writer (or
    :func:`recover_output_set`) finishes that commit, since every file of the new set was complete.
    """
    targets = [Path(p) for p in paths]
    if not targets:
        raise ValueError("atomic_output_set needs at least one path")
    if len({os.path.realpath(t) for t in targets}) != len(targets):
        raise ValueError(f"duplicate paths in one output set: {targets}")
    primary = targets[0]
    with output_lock(primary):
        token = f"{os.getpid()}-{os.urandom(4).hex()}"
        staging: dict[str, Path] = {}
        temporaries: list[Path] = []
        try:
            for target in targets:
                parent = os.path.realpath(target.parent)
                if parent not in staging:
                    staging[parent] = Path(parent) / f".{primary.name}.{token}{_SET_SUFFIX}"
                    staging[parent].mkdir()
                temporaries.append(staging[parent] / target.name)
            main_staging = staging[os.path.realpath(primary.parent)]
            try:
                yield list(temporaries)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    raise EspaceError(
                        f"no space left on the device while writing {primary} ({exc.strerror})",
                        "free some space or choose another output path with -o; the previous output is untouched",
                    ) from None
                raise
            if not temporaries[0].exists():
                raise RuntimeError(f"nothing was written to {temporaries[0]}")
            declared = {t.name for t in temporaries if t.parent == main_staging}
            extras = [p for p in sorted(main_staging.iterdir()) if p.name not in declared]
            moves = [(t, target) for t, target in zip(temporaries[1:], targets[1:], strict=True) if t.exists()]
            moves += [(extra, primary.with_name(extra.name)) for extra in extras]
            moves.append((temporaries[0], primary))
            absent = [str(target) for t, target in zip(temporaries, targets, strict=True) if not t.exists()]
            for source, _ in moves:
                if source.is_file():
                    follow_umask(source, directory=False)
                _fsync_path(source)
            manifest = {
                "moves": [(str(s), str(d)) for s, d in moves],
                "absent": absent,
                "staging": [str(main_staging)] + [str(s) for s in staging.values() if s != main_staging],
            }
            (main_staging / _MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            pause = os.environ.get(_PAUSE_ENV)
            if pause:  # fault injection for tests: everything written, nothing moved
                (main_staging / ".complete").touch()
                time.sleep(float(pause))
                (main_staging / ".complete").unlink()
            with _signals_deferred():
                marker = main_staging / _COMMITTED
                marker.touch()
                _fsync_path(marker)
                _fsync_path(main_staging)
                _commit(manifest, pause=True)
            for directory in {t.parent for t in targets}:
                _fsync_path(directory)
        finally:
            for directory in staging.values():
                shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- stale temporaries


def hold(path: PathLike) -> int:
    """Mark a hidden temporary (file or folder) as in use: a shared flock on it, kept until the returned
    descriptor is closed (or the process dies). :func:`clean_stale_temporaries` skips held ones."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def clean_stale_temporaries(directory: PathLike, patterns: Sequence[str], *, older_than: float = STALE_AFTER_S) -> int:
    """Remove hidden temporaries matching ``patterns`` (globs) in ``directory`` that no live process
    holds (see :func:`hold`) and that are older than ``older_than`` seconds — what a SIGKILLed run left.
    Returns how many were removed; never raises for a file it cannot remove."""
    removed = 0
    now = time.time()
    for pattern in patterns:
        for path in Path(directory).glob(pattern):
            if path.name.endswith(_SET_SUFFIX):  # settled by recover_output_set, under the output's lock
                continue
            try:
                if now - path.lstat().st_mtime < older_than or path.is_symlink():
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            try:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
    return removed


# ---------------------------------------------------------------------------------------------- reports


def finite_json(value: Any, notes: list[str] | None = None, where: str = "") -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers); each
    replacement is named in ``notes`` (``"layers[3].mse_relative was nan"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        if notes is not None:
            notes.append(f"{where or 'value'} was {value}")
        return None
    if isinstance(value, np.generic):
        return finite_json(value.item(), notes, where)
    if isinstance(value, Mapping):
        return {key: finite_json(item, notes, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item, notes, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def strict_json(report: Mapping[str, Any], *, indent: int = 2) -> str:
    """A report as strict JSON: non-finite numbers become null, and a note in ``report["notes"]`` (or
    ``"non_finite"`` when the report has no list of notes) says which, so a reader never meets NaN."""
    notes: list[str] = []
    clean = finite_json(report, notes)
    if notes:
        message = "not finite, written as null: " + ", ".join(notes[:20]) + (" …" if len(notes) > 20 else "")
        if isinstance(clean.get("notes"), list):
            clean["notes"].append(message)
        else:
            clean["non_finite"] = message
    return json.dumps(clean, indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------- JSON in

MAX_JSON_BYTES = 256 * 2**20
_MAX_JSON_INT = 2**63


def parse_json(data: bytes, what: str, fix: str) -> Any:
    """Strict JSON from bytes, or an :class:`EspaceError` naming ``what``: UTF-8 only, no NaN/Infinity
    (nor numbers so large they become infinite), integers within 64 bits, nesting Python can follow."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a number JSON allows")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text[:24]} is too large")
        return value

    def bounded_int(text: str) -> int:
        if len(text) > 20 or abs(int(text)) >= _MAX_JSON_INT:
            raise ValueError(f"{text[:24]}… is too large" if len(text) > 24 else f"{text} is too large")
        return int(text)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EspaceError(f"{what} is not UTF-8 text (byte {exc.start})", fix) from None
    try:
        return json.loads(text, parse_constant=refuse_constant, parse_float=finite_float, parse_int=bounded_int)
    except RecursionError:
        raise EspaceError(f"{what} is not valid JSON (nested too deeply)", fix) from None
    except ValueError as exc:
        raise EspaceError(f"{what} is not valid JSON ({' '.join(str(exc).split())[:120]})", fix) from None


def read_json(path: PathLike, what: str, fix: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """:func:`parse_json` of a file, refusing one larger than ``max_bytes`` before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise EspaceError(f"{what} {path} is {size:,} bytes, more than a {what} can be", fix)
        data = path.read_bytes()
    except OSError as exc:
        raise EspaceError(f"cannot read {what} {path}: {exc.strerror}", "check the path and its permissions") from None
    return parse_json(data, f"{what} {path}", fix)
