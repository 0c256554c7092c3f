"""ONNX Runtime sessions for the pipeline's own runs (calibration, validation, fidelity): one factory, lazy import."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from espace_export._optional import require_onnxruntime
from espace_export.io.models import (
    PROTOBUF_LIMIT,
    external_initializers,
    model_bytes,
    runtime_source,
    save_model,
    without_loader_metadata,
)
from graph_passes.find import external_data_dir

ProviderList = Sequence[str | tuple[str, dict[str, Any]]]

OPTIMIZATION_LEVELS = ("none", "basic", "extended", "all")  # ONNX Runtime graph optimisation, as --optimization


def ort_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    providers: ProviderList | None = None,
    threads: int | None = None,
    optimization: str = "all",
    memory_arena: bool = True,
    spinning: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a model given by path (preferred) or in memory.

    ``providers`` are names or ``(name, options)`` pairs, as ``InferenceSession`` takes them.
    ``memory_arena=False`` turns off the CPU memory arena: a process that opens many sessions one after the
    other (the staged calibration) needs it, since the arena's largest block stays resident after its session
    is gone (measured: 512 MiB left by the first stage of a small decoder, 1.2 GiB by two).
    ``spinning=False`` stops ORT's worker threads busy-waiting for the next run, which takes the cores from
    whatever the process does between runs (healing: torch's steps between the teacher's batches).
    An in-memory model past the protobuf limit is written to a temporary directory with external
    data first, since ONNX Runtime can only read such a model from a path.
    """
    ort = require_onnxruntime("running the model")

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; logging them too only adds noise
    levels = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
    level = dict(zip(OPTIMIZATION_LEVELS, levels, strict=True))[optimization]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = list(providers or ["CPUExecutionProvider"])
    if isinstance(model, onnx.ModelProto):
        if external_data_dir(model):  # weights still on disk: load the graph from beside them
            with runtime_source(model) as source:
                if isinstance(source, Path):
                    return ort.InferenceSession(str(source), options, providers=providers)
        names, arrays = external_initializers(model)
        if names:  # the data's directory is read-only: run on memory maps of the data file
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
            options.add_external_initializers(names, values)
            graph = without_loader_metadata(model)
            session = ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
            session._espace_keepalive = (arrays, values)  # the session reads these buffers for its lifetime
            return session
        if _fits_in_protobuf(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="espace-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path, external_data=True)
            return ort.InferenceSession(str(path), options, providers=providers)
    return ort.InferenceSession(str(model), options, providers=providers)


def _fits_in_protobuf(model: onnx.ModelProto) -> bool:
    try:
        return model_bytes(model) <= PROTOBUF_LIMIT
    except Exception:  # protobuf's upb runtime raises EncodeError instead of sizing a message past 2 GB
        return False
