"""Serving: a Triton Inference Server model repository for a compressed model.

Layout written by :func:`write_triton_repo`::

    REPO/NAME/config.pbtxt          platform, max_batch_size, inputs and outputs (names, types, dims)
    REPO/NAME/1/model.onnx          platform "onnxruntime_onnx" (+ model.onnx.data for external data)
    REPO/NAME/1/model.plan          or platform "tensorrt_plan": a TensorRT engine

``config.pbtxt`` is protobuf text format of Triton's ``inference.ModelConfig``
(``model_config.proto``). :func:`parse_config` reads it back against the subset of that schema we
write, with the same field numbers and enum values, so a typo or a wrong type fails here and not in
the server.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from espace_export.errors import EspaceError
from espace_export.io.models import clean_stale_temporaries, follow_umask, hold, save_model

# ONNX element type → Triton DataType (model_config.proto).
TRITON_DATA_TYPES: dict[int, str] = {
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING",
    TensorProto.BFLOAT16: "TYPE_BF16",
}
_DATA_TYPE_VALUES = {
    "TYPE_INVALID": 0,
    "TYPE_BOOL": 1,
    "TYPE_UINT8": 2,
    "TYPE_UINT16": 3,
    "TYPE_UINT32": 4,
    "TYPE_UINT64": 5,
    "TYPE_INT8": 6,
    "TYPE_INT16": 7,
    "TYPE_INT32": 8,
    "TYPE_INT64": 9,
    "TYPE_FP16": 10,
    "TYPE_FP32": 11,
    "TYPE_FP64": 12,
    "TYPE_STRING": 13,
    "TYPE_BF16": 14,
}
PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
INSTANCE_KINDS = {"auto": None, "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 for a dynamic axis; without the batch axis when max_batch_size > 0


@dataclass(frozen=True)
class TritonConfig:
    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    instance_kind: str | None = None  # KIND_CPU / KIND_GPU; None lets Triton choose
    dynamic_batching: bool = False

    def to_pbtxt(self) -> str:
        lines = [
            f"name: {_quote(self.name)}",
            f"platform: {_quote(self.platform)}",
            f"max_batch_size: {self.max_batch_size}",
        ]
        for field, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines.append(f"{field} [")
            for index, tensor in enumerate(tensors):
                lines += [
                    "  {",
                    f"    name: {_quote(tensor.name)}",
                    f"    data_type: {tensor.data_type}",
                    f"    dims: [ {', '.join(str(d) for d in tensor.dims)} ]",
                    "  }" + ("," if index < len(tensors) - 1 else ""),
                ]
            lines.append("]")
        if self.instance_kind is not None:
            lines.append(f"instance_group [ {{ kind: {self.instance_kind} count: 1 }} ]")
        if self.dynamic_batching:
            lines.append("dynamic_batching { }")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as octal UTF-8 bytes)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def triton_config(
    model: onnx.ModelProto,
    *,
    name: str,
    kind: str = "onnx",
    max_batch_size: int = 0,
    instance: str = "auto",
    dynamic_batching: bool | None = None,
) -> TritonConfig:
    """The Triton configuration of ``model`` (read from its graph inputs and outputs).

    With ``max_batch_size > 0`` Triton adds the batch axis itself, so the first axis of every input
    and output must be one shared dynamic axis, and it is left out of ``dims``; with 0 the dims are
    the full shapes, ``-1`` where dynamic.

    Raises:
        EspaceError: an input or output type Triton has no DataType for, an output of unknown rank,
            or ``max_batch_size > 0`` on a model without a shared dynamic batch axis.
    """
    if kind not in PLATFORMS:
        raise EspaceError(f"unknown model kind {kind!r}", "use onnx or plan")
    if instance not in INSTANCE_KINDS:
        raise EspaceError(f"unknown instance kind {instance!r}", f"choose from {', '.join(INSTANCE_KINDS)}")
    if max_batch_size < 0:
        raise EspaceError(f"--max-batch-size must be at least 0, got {max_batch_size}", "use 0 to disable batching")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    outputs = list(model.graph.output)
    if any(_dims(v) is None for v in outputs):
        inferred = onnx.shape_inference.infer_shapes(model)
        by_name = {v.name: v for v in inferred.graph.output}
        outputs = [by_name.get(v.name, v) for v in outputs]
    shapes: dict[str, list[int | str | None]] = {}
    for value in inputs + outputs:
        dims = _dims(value)
        if dims is None:
            raise EspaceError(
                f"the rank of {value.name!r} is unknown, and Triton needs its dims",
                "export the model with output shapes (torch.onnx.export does by default) or run onnx shape inference",
            )
        shapes[value.name] = dims
    if max_batch_size > 0:
        firsts = {tuple(dims[:1]) for dims in shapes.values()}
        leading = next(iter(firsts)) if len(firsts) == 1 else None
        if leading is None or not leading or isinstance(leading[0], int):
            raise EspaceError(
                f"--max-batch-size {max_batch_size} needs every input and output to start with one shared dynamic "
                f"batch axis; this model's first axes are {sorted(str(f) for f in firsts)}",
                "pass --max-batch-size 0 (Triton then takes the full shapes)",
            )

    def tensor(value: onnx.ValueInfoProto) -> TensorConfig:
        elem = value.type.tensor_type.elem_type
        if elem not in TRITON_DATA_TYPES:
            raise EspaceError(
                f"{value.name!r} has ONNX type {TensorProto.DataType.Name(elem)}, which Triton cannot carry",
                "cast it to a supported type in the model",
            )
        dims = shapes[value.name][1:] if max_batch_size > 0 else shapes[value.name]
        return TensorConfig(value.name, TRITON_DATA_TYPES[elem], tuple(d if isinstance(d, int) else -1 for d in dims))

    return TritonConfig(
        name=name,
        platform=PLATFORMS[kind],
        max_batch_size=max_batch_size,
        inputs=tuple(tensor(v) for v in inputs),
        outputs=tuple(tensor(v) for v in outputs),
        instance_kind=INSTANCE_KINDS[instance] if kind == "onnx" else "KIND_GPU",
        dynamic_batching=max_batch_size > 0 if dynamic_batching is None else dynamic_batching,
    )


def model_name(path: Path) -> str:
    """A Triton model name from a file name: ``llama.espace.onnx`` → ``llama_espace``."""
    stem = path.name.removesuffix(".onnx").removesuffix(".plan")
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "model"


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def write_triton_repo(
    repo: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    *,
    engine: bytes | str | os.PathLike[str] | None = None,
    name: str | None = None,
    version: int = 1,
    max_batch_size: int = 0,
    instance: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write (or with ``overwrite`` replace) ``REPO/NAME`` for Triton; returns that directory.

    The ONNX model is the source of names, types and dims; with ``engine`` (bytes or a ``.plan``
    path, built from that ONNX) the repository serves the engine instead. An ONNX model with external
    data is re-saved as ``model.onnx`` + ``model.onnx.data`` (the relative location Triton's ONNX
    Runtime backend resolves); one without is copied. The model directory is assembled beside its
    final place and moved in with a rename, so the server never sees half of it.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EspaceError(f"model not found: {onnx_path}", "check the path to the .onnx file")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**31 - 1:
        raise EspaceError(f"the model version must be an integer from 1, got {version}", "use --triton-version 1")
    repo = Path(repo)
    name = name or model_name(onnx_path)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or len(name) > 200:
        raise EspaceError(f"{name!r} is not a usable Triton model name", "use letters, digits, '_', '-' and '.'")
    if repo.exists() and not repo.is_dir():
        raise EspaceError(f"--triton-repo {repo} is a file", "pass a directory (it is created if missing)")
    target = repo / name
    if target.exists() and not overwrite:
        raise EspaceError(f"{target} already exists", "pass --overwrite to replace it, or choose --triton-name")
    try:
        structure = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise EspaceError(
            f"{onnx_path} is not a readable ONNX model ({reason})", "re-export or copy it again"
        ) from None
    kind = "plan" if engine is not None else "onnx"
    config = triton_config(structure, name=name, kind=kind, max_batch_size=max_batch_size, instance=instance)

    repo.mkdir(parents=True, exist_ok=True)  # only now: a rejected call leaves no folder behind
    staging_dir = _staging_parent(repo)
    prefix = f".{repo.name}.{name}." if staging_dir != repo else f".{name}."
    clean_stale_temporaries(staging_dir, [f"{glob.escape(prefix)}*.tmp"])
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=staging_dir))
    held = hold(staging)
    try:
        follow_umask(staging, directory=True)  # the model folder a server reads: not mkdtemp's 0700
        version_dir = staging / str(version)
        version_dir.mkdir()
        destination = version_dir / MODEL_FILES[kind]
        if isinstance(engine, bytes):
            destination.write_bytes(engine)
        elif engine is not None:
            shutil.copyfile(engine, destination)
        elif _uses_external_data(structure):
            save_model(onnx.load(str(onnx_path), load_external_data=True), destination, external_data=True)
        else:
            shutil.copyfile(onnx_path, destination)
        (staging / "config.pbtxt").write_text(config.to_pbtxt(), encoding="utf-8")
        parse_config((staging / "config.pbtxt").read_text(encoding="utf-8"))  # our own output must parse
        if target.is_dir():
            _keep_other_versions(target, staging, version=version, model_file=MODEL_FILES[kind])
        _swap_in(staging, target, aside=staging_dir / f"{prefix}{os.getpid()}.old.tmp")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(held)
    return target


def _staging_parent(repo: Path) -> Path:
    """Where to assemble a model folder: beside the repository (a polling server never sees it), when
    that is writable and on the same file system (a rename must move it in); else inside, hidden."""
    parent = repo.resolve().parent
    try:
        if os.access(parent, os.W_OK) and parent.stat().st_dev == repo.stat().st_dev:
            return parent
    except OSError:
        pass
    return repo


def _keep_other_versions(target: Path, staging: Path, *, version: int, model_file: str) -> None:
    """Carry the existing model's other version folders into the new one (hard links, else copies).

    Versions that hold another kind of model (an ONNX model where the new config serves a TensorRT
    plan) cannot be served by the new config and are not carried."""
    for child in sorted(target.iterdir()):
        if not child.is_dir() or not child.name.isdigit() or child.name == str(version):
            continue
        if not (child / model_file).exists():
            continue
        try:
            shutil.copytree(child, staging / child.name, copy_function=os.link)
        except OSError:
            shutil.rmtree(staging / child.name, ignore_errors=True)
            shutil.copytree(child, staging / child.name)


def _swap_in(staging: Path, target: Path, aside: Path | None = None) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is moved to ``aside`` first and removed after."""
    old = None
    if target.exists():
        old = aside or target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading back


def _model_config_class() -> Any:
    """``inference.ModelConfig`` restricted to the fields we write, with model_config.proto's numbers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="espace_model_config.proto", package="inference", syntax="proto3")

    def enum(name: str, values: Sequence[tuple[str, int]], parent: Any = file) -> None:
        proto = parent.enum_type.add(name=name)
        for value_name, number in values:
            proto.value.add(name=value_name, number=number)

    def message(name: str, fields: Sequence[tuple[str, int, int, int, str | None]]) -> None:
        proto = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = proto.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    enum("DataType", list(_DATA_TYPE_VALUES.items()))
    enum("Kind", [("KIND_AUTO", 0), ("KIND_GPU", 1), ("KIND_CPU", 2), ("KIND_MODEL", 3)])
    message(
        "ModelInput",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
            ("dims", 4, F.TYPE_INT64, many, None),
            ("optional", 8, F.TYPE_BOOL, one, None),
        ],
    )
    message(
        "ModelOutput",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
            ("dims", 3, F.TYPE_INT64, many, None),
        ],
    )
    message(
        "ModelInstanceGroup",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("count", 2, F.TYPE_INT32, one, None),
            ("gpus", 3, F.TYPE_INT32, many, None),
            ("kind", 4, F.TYPE_ENUM, one, ".inference.Kind"),
        ],
    )
    message("ModelDynamicBatching", [])
    message(
        "ModelConfig",
        [
            ("name", 1, F.TYPE_STRING, one, None),
            ("platform", 2, F.TYPE_STRING, one, None),
            ("max_batch_size", 4, F.TYPE_INT32, one, None),
            ("input", 5, F.TYPE_MESSAGE, many, ".inference.ModelInput"),
            ("output", 6, F.TYPE_MESSAGE, many, ".inference.ModelOutput"),
            ("instance_group", 7, F.TYPE_MESSAGE, many, ".inference.ModelInstanceGroup"),
            ("default_model_filename", 8, F.TYPE_STRING, one, None),
            ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
            ("backend", 17, F.TYPE_STRING, one, None),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text into a ``ModelConfig`` message (our schema subset); an
    :class:`EspaceError` when it is not valid text format for that schema."""
    from google.protobuf import text_format

    message = _model_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise EspaceError(
            f"invalid Triton config: {exc}", "fix config.pbtxt or rewrite it with --triton-repo"
        ) from None
    return message


def data_type_name(value: int) -> str:
    """``11`` → ``TYPE_FP32``."""
    return {v: k for k, v in _DATA_TYPE_VALUES.items()}[value]
