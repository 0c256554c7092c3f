"""Builders: turn an ONNX model into something that runs.

ONNX Runtime sessions live here; engines for other backends build on the same inputs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from espace_export.model_io import (
    PROTOBUF_LIMIT,
    external_initializers,
    model_bytes,
    runtime_source,
    save_model,
    without_loader_metadata,
)
from graph_passes.find import external_data_dir


def ort_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
) -> object:
    """An ``onnxruntime.InferenceSession`` for a model given by path (preferred) or in memory.

    An in-memory model past the protobuf limit is written to a temporary directory with external
    data first, since ONNX Runtime can only read such a model from a path.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; logging them too only adds noise
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
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
        if model_bytes(model) <= PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="espace-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path, external_data=True)
            return ort.InferenceSession(str(path), options, providers=providers)
    return ort.InferenceSession(str(model), options, providers=providers)
