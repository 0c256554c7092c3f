"""Quantization as a stage: ONNX Runtime's quantizers applied to a (compressed) model, measured beside it.

ESPACE's projected pair ``(X·P)·(PᵀW)`` is two ordinary MatMuls with constant weights, so the libraries'
quantizers take it as they take the dense GEMM. This module only chooses and runs them:

| mode | quantizer | weights | activations | runs on |
|---|---|---|---|---|
| ``int8`` | ``quantize_dynamic`` (MatMulInteger) | int8, per output channel by default | uint8, per tensor, at run time | ORT CPU |
| ``int4`` | ``MatMulNBitsQuantizer`` (MatMulNBits) | 4-bit, blocks of 32 along K, symmetric | float | ORT CPU/CUDA |
| ``qdq-int8`` | ``quantize_static``, QDQ format | int8, per channel | int8, per tensor, MinMax over the calibration batches | TensorRT, ORT |

Only MatMul and Gemm are quantized (the weight GEMMs and, for ``int8``, the attention products the dynamic
quantizer also takes); embeddings, norms and softmax stay float. The output is written atomically; the
result carries the file sizes and the fidelity of the quantized outputs to the float model's
(:func:`espace_export.pipeline.output_fidelity`) on held-out batches.

Making the pair quantize well (balancing the ranges of ``X·P`` and ``PᵀW`` before quantizing) is the job
of :mod:`graph_passes.equalize`, run before this stage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.errors import EspaceError
from espace_export.io.data import BatchListReader, complete_feed, input_specs
from espace_export.io.models import PROTOBUF_LIMIT, atomic_output, check_model, check_writable, load_model, model_bytes

QUANTIZE_MODES = ("none", "int8", "int4", "qdq-int8")
QUANTIZED_OPS = ("MatMul", "Gemm")
INT4_BLOCK = 32


@dataclass
class QuantizationResult:
    """What :func:`quantize_model` wrote and how close it stays to the float model."""

    output: Path
    mode: str
    bytes_float: int
    bytes_quantized: int
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)  # output → relative_l2, cosine_*

    def as_report(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "output": str(self.output),
            "bytes_float": self.bytes_float,
            "bytes_quantized": self.bytes_quantized,
            "size_ratio": self.bytes_quantized / self.bytes_float if self.bytes_float else None,
            "fidelity_vs_float": self.fidelity,
        }


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise EspaceError(f"unknown quantization {mode!r}", f"choose from {', '.join(QUANTIZE_MODES)}")


@dataclass(frozen=True)
class QuantizeSettings:
    """How :func:`quantize_model` quantizes. ``per_channel``: int8 weight scales per output channel (``int8``,
    ``qdq-int8``); ``block_size`` and ``accuracy_level`` (ORT's MatMulNBits compute type; 4 = int8 activations
    on CPU) for ``int4``; ``external_data``: force or forbid external data in the output (None: when the float
    model needs it)."""

    per_channel: bool = True
    block_size: int = INT4_BLOCK
    accuracy_level: int | None = None
    external_data: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EspaceError(f"int4 block size {self.block_size} is not a power of two ≥ 16", "use 32, 64 or 128")


def quantize_model(
    model: str | os.PathLike[str] | onnx.ModelProto,
    output: str | os.PathLike[str],
    mode: str,
    calibration_batches: Sequence[dict[str, np.ndarray]] | None = None,
    *,
    holdout_batches: Sequence[dict[str, np.ndarray]] | None = None,
    settings: QuantizeSettings | None = None,
    **overrides: Any,
) -> QuantizationResult:
    """Quantize ``model`` (a path or a loaded model) with ``mode`` and write it to ``output``, atomically.

    ``calibration_batches`` feed ``qdq-int8``'s activation ranges (required there, unused otherwise);
    ``holdout_batches`` (default: the calibration batches) measure the fidelity of the quantized outputs
    to the float model's. ``settings`` (:class:`QuantizeSettings`), or its fields as keywords over it
    (``per_channel=False``, ``block_size=64``). Returns a :class:`QuantizationResult`.
    """
    check_mode(mode)
    if mode == "none":
        raise EspaceError("quantization mode 'none' writes nothing", "choose int8, int4 or qdq-int8")
    if mode == "qdq-int8" and not calibration_batches:
        raise EspaceError("qdq-int8 needs calibration batches for its activation ranges", "give calibration data")
    settings = replace(settings or QuantizeSettings(), **overrides)
    output = check_writable(Path(output))
    float_model = model if isinstance(model, onnx.ModelProto) else load_model(model)
    bytes_float = model_bytes(float_model)
    external_data = settings.external_data if settings.external_data is not None else bytes_float > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix="espace-quantize.") as work:
        source = Path(work) / "float.onnx"  # the quantizers read a path best (external data, shape inference)
        onnx.save_model(float_model, str(source), save_as_external_data=external_data, location="float.onnx.data")
        with atomic_output(output) as tmp:
            _QUANTIZERS[mode](  # type: ignore[operator]
                source,
                tmp,
                calibration_batches=calibration_batches,
                per_channel=settings.per_channel,
                block_size=settings.block_size,
                accuracy_level=settings.accuracy_level,
                external_data=external_data,
            )
            check_model(tmp)
            bytes_quantized = _file_bytes(tmp)
            fidelity = _fidelity(source, tmp, holdout_batches or calibration_batches, float_model)
    return QuantizationResult(output, mode, bytes_float, bytes_quantized, fidelity)


def _file_bytes(path: Path) -> int:
    """The model file and any external data file written beside it."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def _fidelity(
    reference: Path,
    quantized: Path,
    batches: Sequence[dict[str, np.ndarray]] | None,
    float_model: onnx.ModelProto,
) -> dict[str, dict[str, float]]:
    if not batches:
        return {}
    from espace_export.projection.fidelity import output_fidelity
    from espace_export.runtime import ort_session

    return output_fidelity(ort_session(reference), ort_session(quantized), batches, input_specs(float_model))


def _dynamic_int8(source: Path, output: Path, *, per_channel: bool, external_data: bool, **_: Any) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        output,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        use_external_data_format=external_data,
    )


def _weight_only_int4(
    source: Path, output: Path, *, block_size: int, accuracy_level: int | None, external_data: bool, **_: Any
) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        str(source), bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=external_data)


def _static_qdq_int8(
    source: Path,
    output: Path,
    *,
    calibration_batches: Sequence[dict[str, np.ndarray]],
    per_channel: bool,
    external_data: bool,
    **_: Any,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    specs = input_specs(onnx.load(str(source), load_external_data=False))
    reader = BatchListReader([complete_feed(batch, specs) for batch in calibration_batches])
    quantize_static(
        source,
        output,
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=external_data,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True},  # TensorRT takes symmetric int8 activations only
    )


# ---- making the pair quantize well ---------------------------------------------------------------------


def projected_activation_ranges(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``max|(X·P)_j|`` per component j of every projected pair's ``X·P`` over ``batches``, by project node
    (ONNX Runtime runs a copy of ``model`` with those tensors as extra outputs)."""
    from espace_export.runtime import ort_session
    from graph_passes.equalize import pair_groups

    groups = pair_groups(model)
    if not groups or not batches:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    for initializer in probe.graph.initializer:
        if initializer.name == groups[0].projection:
            elem_type = initializer.data_type
    for group in groups:
        if group.projected not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(group.projected, elem_type, None))
    session = ort_session(probe)
    specs = input_specs(model)
    names = [g.projected for g in groups]
    ranges = {g.project_node: np.zeros(g.L) for g in groups}
    for batch in batches:
        for group, value in zip(groups, session.run(names, complete_feed(batch, specs)), strict=True):
            column_max = np.abs(np.asarray(value, dtype=np.float64)).reshape(-1, group.L).max(axis=0)
            ranges[group.project_node] = np.maximum(ranges[group.project_node], column_max)
    return ranges


def equalize_pairs(
    model: onnx.ModelProto,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    alpha: float | None = 0.5,
    rotate: bool = False,
) -> onnx.ModelProto:
    """Balance every projected pair of ``model`` for quantization, in place (see :mod:`graph_passes.equalize`).

    ``rotate``: first an orthogonal (Hadamard) rotation inside each pair's L-space; ``alpha``: then
    SmoothQuant scales from the ranges of ``X·P`` measured on ``batches`` (None: no scaling). The model
    computes the same function afterwards, to float round-off.
    """
    from graph_passes.equalize import folded_row_max, pair_groups, rescale_pairs, rotate_pairs, smoothing_scales

    if rotate:
        rotate_pairs(model)
    if alpha is not None:
        ranges = projected_activation_ranges(model, batches)
        groups = {g.project_node: g for g in pair_groups(model)}
        scales = {name: smoothing_scales(a, folded_row_max(model, groups[name]), alpha) for name, a in ranges.items()}
        rescale_pairs(model, scales)
    return model


_QUANTIZERS = {"int8": _dynamic_int8, "int4": _weight_only_int4, "qdq-int8": _static_qdq_int8}


__all__ = [
    "QUANTIZE_MODES",
    "QuantizationResult",
    "check_mode",
    "equalize_pairs",
    "projected_activation_ranges",
    "quantize_model",
]
