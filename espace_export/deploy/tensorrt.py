"""TensorRT engines: an optimisation profile over the dynamic axes, the build configuration, the build.

Only :func:`build_engine` and :class:`TensorRTRunner` need TensorRT; they import it lazily, so the
rest (shape profiles, the configuration choice) runs and is tested on machines without a GPU.

Written against the TensorRT 10 Python API:

- ``builder.create_network(0)``: explicit batch is the only mode since 10.0 (the ``EXPLICIT_BATCH``
  flag is deprecated and ignored); ``STRONGLY_TYPED`` is the one creation flag we may set.
- ``OnnxParser.parse_from_file(path)``: the parser reads external data relative to the model file,
  so models past 2 GB work, which ``parse(bytes)`` cannot do.
- ``IBuilderConfig.set_flag(trt.BuilderFlag.FP16)`` on a weakly typed network; one optimisation
  profile (``create_optimization_profile``/``set_shape``) over the dynamic batch and sequence axes;
  ``builder.build_serialized_network`` (``build_engine`` is gone since 10.0).

TensorRT 11 removes weak typing: every network is strongly typed (the creation flag is accepted and
ignored) and ``BuilderFlag.FP16`` no longer exists (weak typing was deprecated in 10.12). There the
precision comes from the graph's own types, so an FP16 engine needs an FP16 ONNX first (for example
``python -m modelopt.onnx.autocast --onnx_path model.onnx --output_path model_fp16.onnx``).
:func:`plan_build` encodes that choice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export._optional import require
from espace_export.errors import EspaceError
from espace_export.io.data import InputSpec, input_specs
from espace_export.io.models import atomic_output

Shape = tuple[int, ...]
TENSORRT_EXTRA = "pip install 'espace-export[tensorrt]'"

# Symbolic dimension names the exporters write for the batch and sequence axes.
_BATCH_NAMES = re.compile(r"batch|^n$|^b$", re.IGNORECASE)
_SEQUENCE_NAMES = re.compile(r"seq|sequence|length|len|token|past|total|^s$|^t$", re.IGNORECASE)


@dataclass(frozen=True)
class InputProfile:
    """The smallest, most frequent (the one TensorRT tunes for) and largest shape of one input."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile: a shape range per model input, in the model's input order."""

    inputs: tuple[InputProfile, ...]

    def shapes(self, which: str) -> dict[str, Shape]:
        """``{input: shape}`` for ``which`` in ``min``/``opt``/``max``."""
        return {entry.name: getattr(entry, which) for entry in self.inputs}

    def as_strings(self) -> dict[str, str]:
        """``{"min": "input_ids:1x1,attention_mask:1x1", ...}``: the format of trtexec's ``--minShapes``
        and of ONNX Runtime's TensorRT provider options ``trt_profile_min_shapes``."""
        return {
            which: ",".join(f"{name}:{format_shape(shape)}" for name, shape in self.shapes(which).items())
            for which in ("min", "opt", "max")
        }


def format_shape(shape: Shape) -> str:
    """``(1, 128)`` → ``1x128``; a scalar is an empty string, as trtexec writes it."""
    return "x".join(str(d) for d in shape)


def parse_shapes(values: Iterable[str] | str | None) -> dict[str, Shape]:
    """Read shape specs such as ``input_ids:1x128`` or polygraphy's ``input_ids:[1,128]``.

    Each value may hold several specs separated by commas or spaces (outside brackets); the option
    may also be repeated. Names may contain dots and colons (the last colon separates the shape).
    """
    if values is None:
        return {}
    if isinstance(values, str):
        values = [values]
    shapes: dict[str, Shape] = {}
    for value in values:
        for spec in _split_specs(value):
            name, sep, text = spec.rpartition(":")
            if not sep or not name:
                raise EspaceError(
                    f"cannot read the shape {spec!r}", "write NAME:DIMS such as input_ids:1x128 or input_ids:[1,128]"
                )
            text = text.strip()
            if text.startswith("[") and text.endswith("]"):
                parts = [p.strip() for p in text[1:-1].split(",") if p.strip()]
            else:
                parts = [p for p in text.split("x") if p] if text else []
            try:
                shape = tuple(int(p) for p in parts)
            except ValueError:
                raise EspaceError(
                    f"cannot read the shape {spec!r}: dimensions must be whole numbers",
                    "write NAME:DIMS such as input_ids:1x128 (no -1 or names in a profile)",
                ) from None
            if any(d < 0 for d in shape):
                raise EspaceError(f"the shape {spec!r} has a negative dimension", "profile shapes are concrete sizes")
            if name in shapes and shapes[name] != shape:
                raise EspaceError(f"input {name!r} is given two shapes", "give each input one shape per option")
            shapes[name] = shape
    return shapes


def _split_specs(value: str) -> list[str]:
    specs, current, depth = [], "", 0
    for char in value:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char in ", " and depth == 0:
            if current:
                specs.append(current)
            current = ""
        else:
            current += char
    if current:
        specs.append(current)
    return specs


def axis_role(dim: int | str | None, axis: int, spec: InputSpec) -> str | None:
    """``"batch"``, ``"sequence"`` or None (static, or a name we cannot place) for one input axis.

    Named dims go by their name (``batch``, ``seq``, ``sequence_length``, ``past_sequence_length``...);
    unnamed dynamic dims of a 2-D integer input (token ids and masks) are batch then sequence.
    """
    if isinstance(dim, int):
        return None
    if isinstance(dim, str):
        if _BATCH_NAMES.search(dim):
            return "batch"
        if _SEQUENCE_NAMES.search(dim):
            return "sequence"
        return None
    if spec.is_integer and len(spec.shape) == 2:
        return "batch" if axis == 0 else "sequence"
    return None


def derive_profile(
    specs: Sequence[InputSpec],
    *,
    seq: int,
    max_seq: int | None = None,
    batch: int = 1,
    max_batch: int | None = None,
    min_shapes: Mapping[str, Shape] | None = None,
    opt_shapes: Mapping[str, Shape] | None = None,
    max_shapes: Mapping[str, Shape] | None = None,
) -> ShapeProfile:
    """A profile from the model's inputs: batch axes span ``1..batch..max_batch``, sequence axes
    ``1..seq..max_seq``, static axes stay fixed. Explicit ``min/opt/max_shapes`` replace the derived
    shape of the inputs they name.

    Raises :class:`EspaceError` for an unknown input name, a rank or static-dim mismatch, a range
    that is not ``min ≤ opt ≤ max``, or a dynamic axis that is neither batch nor sequence and has no
    explicit shape.
    """
    max_seq = seq if max_seq is None else max_seq
    max_batch = batch if max_batch is None else max_batch
    if min(seq, batch) < 1 or max_seq < seq or max_batch < batch:
        raise EspaceError(
            f"profile sizes must satisfy 1 ≤ seq ≤ max-seq and 1 ≤ batch ≤ max-batch (got seq {seq}, max-seq "
            f"{max_seq}, batch {batch}, max-batch {max_batch})",
            "raise --max-seq/--max-batch or lower --seq/--batch",
        )
    overrides = {"min": dict(min_shapes or {}), "opt": dict(opt_shapes or {}), "max": dict(max_shapes or {})}
    names = [spec.name for spec in specs]
    for which, given in overrides.items():
        for name in given:
            if name not in names:
                raise EspaceError(
                    f"--{which}-shapes names {name!r}, which is not an input of the model",
                    f"use the model's inputs: {', '.join(names)}",
                )
    ranges = {"batch": (1, batch, max_batch), "sequence": (1, seq, max_seq)}
    entries = []
    for spec in specs:
        derived: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        unplaced = []
        for axis, dim in enumerate(spec.shape):
            role = axis_role(dim, axis, spec)
            if isinstance(dim, int):
                low = mid = high = dim
            elif role is not None:
                low, mid, high = ranges[role]
            else:
                unplaced.append(f"axis {axis} ({dim or 'unnamed'})")
                low = mid = high = -1
            derived["min"].append(low)
            derived["opt"].append(mid)
            derived["max"].append(high)
        shapes = {which: overrides[which].get(spec.name, tuple(derived[which])) for which in ("min", "opt", "max")}
        for which, shape in shapes.items():
            if len(shape) != len(spec.shape):
                raise EspaceError(
                    f"--{which}-shapes gives {spec.name!r} rank {len(shape)}, the model input has rank "
                    f"{len(spec.shape)} {list(spec.shape)}",
                    "give one size per axis",
                )
            if -1 in shape:
                raise EspaceError(
                    f"input {spec.name!r} has a dynamic {', '.join(unplaced)} that is neither batch nor sequence",
                    f"give its sizes with --min-shapes/--opt-shapes/--max-shapes {spec.name}:DIMS",
                )
            for axis, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
                if isinstance(dim, int) and size != dim:
                    raise EspaceError(
                        f"--{which}-shapes gives {spec.name!r} size {size} on axis {axis}, which the model fixes at {dim}",
                        f"use {dim} there",
                    )
        if not all(lo <= mid <= hi for lo, mid, hi in zip(shapes["min"], shapes["opt"], shapes["max"], strict=True)):
            raise EspaceError(
                f"the profile of {spec.name!r} is not min ≤ opt ≤ max "
                f"({format_shape(shapes['min'])}, {format_shape(shapes['opt'])}, {format_shape(shapes['max'])})",
                "order the three shapes from smallest to largest",
            )
        entries.append(InputProfile(spec.name, shapes["min"], shapes["opt"], shapes["max"]))
    return ShapeProfile(tuple(entries))


def fixed_profile(feed: Mapping[str, np.ndarray]) -> ShapeProfile:
    """A profile with min = opt = max = the shapes of ``feed`` (engines timed at one shape)."""
    return ShapeProfile(tuple(InputProfile(name, a.shape, a.shape, a.shape) for name, a in feed.items()))


@dataclass(frozen=True)
class EngineOptions:
    """What the user asks of a TensorRT build.

    ``strongly_typed=None`` lets :func:`plan_build` decide from the model and the TensorRT version.
    """

    fp16: bool = True
    strongly_typed: bool | None = None
    workspace_gib: float | None = None
    optimization_level: int | None = None  # builder_optimization_level, 0..5 (TensorRT's default: 3)
    timing_cache: Path | None = None
    verbose: bool = False


@dataclass(frozen=True)
class BuildPlan:
    """How the build runs: network typing, builder flags (names of ``trt.BuilderFlag`` members), and why."""

    trt_major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    precision: str
    notes: tuple[str, ...] = field(default_factory=tuple)


_REDUCED_FLOATS = ("float16", "bfloat16")


def plan_build(options: EngineOptions, *, trt_major: int, model_float_dtype: str) -> BuildPlan:
    """The configuration choice for one build (the table in docs/deployment.md).

    ================  =============  ======  =========================================================
    TensorRT          model floats   --fp16  network / flags
    ================  =============  ======  =========================================================
    10.x              float32        yes     weakly typed, ``BuilderFlag.FP16`` (deprecated in 10.12)
    10.x              float32        no      weakly typed, no flag (FP32, TF32 where the GPU has it)
    10.x              float16/bf16   any     strongly typed (``STRONGLY_TYPED``): the graph's types
    11.x              float16/bf16   any     strongly typed (always; the flag is ignored)
    11.x              float32        no      strongly typed FP32
    11.x              float32        yes     refused: convert the ONNX to FP16 first (no FP16 flag)
    ================  =============  ======  =========================================================

    ``strongly_typed=True`` on TensorRT 10 with an FP32 model and ``--fp16`` is refused (a strongly
    typed network would run FP32); ``strongly_typed=False`` on TensorRT 11 is refused (no weak typing).
    """
    if trt_major < 10:
        raise EspaceError(f"TensorRT {trt_major}.x is too old for this builder", f"{TENSORRT_EXTRA} (TensorRT ≥ 10)")
    reduced = model_float_dtype in _REDUCED_FLOATS
    if trt_major >= 11:
        if options.strongly_typed is False:
            raise EspaceError(
                "TensorRT 11 has no weakly typed networks", "drop --no-strongly-typed: every network is strongly typed"
            )
        if options.fp16 and not reduced:
            raise EspaceError(
                f"TensorRT {trt_major} builds strongly typed networks only, and this model's weights are "
                f"{model_float_dtype}: an FP16 engine needs an FP16 ONNX",
                "convert it first (python -m modelopt.onnx.autocast --onnx_path model.onnx --output_path "
                "model_fp16.onnx) or pass --no-fp16 for an FP32 engine",
            )
        return BuildPlan(
            trt_major,
            True,
            (),
            model_float_dtype,
            ("TensorRT 11: strongly typed (the creation flag is ignored); precision follows the graph's types",),
        )
    if reduced and options.strongly_typed is not False:
        return BuildPlan(
            trt_major,
            True,
            (),
            model_float_dtype,
            ("the model is already in reduced precision: strongly typed network, types from the graph",),
        )
    if options.fp16:
        if options.strongly_typed:
            raise EspaceError(
                f"a strongly typed network runs this {model_float_dtype} model in {model_float_dtype}, not FP16",
                "drop --strongly-typed (TensorRT 10 builds FP16 with the FP16 builder flag) or convert the ONNX to "
                "FP16 first",
            )
        return BuildPlan(
            trt_major,
            False,
            ("FP16",),
            "float16 (builder flag)",
            (
                "weakly typed network with BuilderFlag.FP16: deprecated since TensorRT 10.12 and removed in 11, "
                "where an FP16 ONNX and a strongly typed network replace it",
            ),
        )
    if options.strongly_typed:
        return BuildPlan(trt_major, True, (), model_float_dtype, ("strongly typed network in the graph's types",))
    return BuildPlan(trt_major, False, (), "float32 (TF32 where the GPU has it)", ())


def model_float_dtype(model: onnx.ModelProto) -> str:
    """The dtype most of the model's float weights are stored in (read from the protos, not the data)."""
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE,
        ):
            name = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            if tensor.data_type == onnx.TensorProto.BFLOAT16:
                name = "bfloat16"
            counts[name] = counts.get(name, 0) + int(np.prod(tensor.dims, dtype=np.int64))
    return max(counts, key=lambda k: counts[k]) if counts else "float32"


def import_tensorrt() -> Any:
    """``import tensorrt``, or an :class:`EspaceError` naming the extra to install."""
    return require("tensorrt", extra="tensorrt", purpose="the tensorrt backend (an NVIDIA GPU)")


def tensorrt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(
    onnx_path: str | os.PathLike[str],
    profile: ShapeProfile,
    options: EngineOptions | None = None,
    *,
    save_engine: str | os.PathLike[str] | None = None,
    on_plan: Callable[[BuildPlan], None] | None = None,
) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file (parsed from its path: external data works).

    Args:
        onnx_path: the model; its external data must lie where the model says.
        profile: the optimisation profile over the dynamic axes (see :func:`derive_profile`).
        options: precision and builder settings (:class:`EngineOptions`).
        save_engine: also write the engine there (``model.plan``), atomically.
        on_plan: called with the :class:`BuildPlan` before the (long) build starts.

    Raises:
        EspaceError: TensorRT missing, the ONNX parser rejecting the model, a profile that does not
            cover the network's dynamic inputs, or a failed build.
    """
    options = options or EngineOptions()
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    structure = onnx.load(str(onnx_path), load_external_data=False)
    plan = plan_build(options, trt_major=tensorrt_major(trt), model_float_dtype=model_float_dtype(structure))
    if on_plan is not None:
        on_plan(plan)

    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _parse_network(trt, builder, logger, onnx_path, plan)  # the parser outlives the build
    config, cache = _builder_config(trt, builder, plan, options)
    config.add_optimization_profile(_optimization_profile(builder, network, profile))

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EspaceError(
            f"TensorRT could not build an engine from {onnx_path}",
            "rerun with --verbose for TensorRT's log; a larger --workspace-gib or a smaller --max-seq may help",
        )
    engine = bytes(serialized)
    if cache is not None and options.timing_cache is not None:
        with atomic_output(options.timing_cache) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    if save_engine is not None:
        with atomic_output(save_engine) as tmp:
            tmp.write_bytes(engine)
    return engine


def _parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, plan: BuildPlan) -> tuple[Any, Any]:
    """The TensorRT network parsed from the ONNX file, and its parser (it must outlive the build)."""
    flags = 0
    if plan.strongly_typed and plan.trt_major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EspaceError(
            f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:400]}",
            "check the opset and operators against TensorRT's ONNX support matrix, or use --backend ort-cuda",
        )
    return network, parser


def _builder_config(trt: Any, builder: Any, plan: BuildPlan, options: EngineOptions) -> tuple[Any, Any]:
    """The builder config (flags, workspace, optimisation level) and the timing cache it reads, if any."""
    config = builder.create_builder_config()
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    cache = None
    if options.timing_cache is not None:
        previous = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def _optimization_profile(builder: Any, network: Any, profile: ShapeProfile) -> Any:
    """``profile``'s ranges for every dynamic network input; an input it does not name is an error."""
    trt_profile = builder.create_optimization_profile()
    ranges = {entry.name: entry for entry in profile.inputs}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if all(d >= 0 for d in tensor.shape):
            continue  # static input: nothing to profile
        entry = ranges.get(tensor.name)
        if entry is None:
            raise EspaceError(
                f"the TensorRT network input {tensor.name!r} {tuple(tensor.shape)} is dynamic but not in the profile",
                f"give it with --min-shapes/--opt-shapes/--max-shapes {tensor.name}:DIMS",
            )
        trt_profile.set_shape(tensor.name, entry.min, entry.opt, entry.max)
    return trt_profile


class TensorRTRunner:
    """Runs a serialized engine through polygraphy's ``TrtRunner`` (device buffers, shapes, streams).

    Satisfies :class:`espace_export.deploy.build.Runner`.
    """

    backend = "tensorrt"

    def __init__(self, engine: bytes) -> None:
        import_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(engine))
        self._runner.activate()
        self.device = cuda_device_name()
        self._staged: list[Any] = []

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self._runner.infer(feed_dict=dict(feed))
        return [np.asarray(v) for v in outputs.values()]

    def prepare(self, feed: Mapping[str, np.ndarray]) -> Callable[[], float]:
        """Copy the inputs to the device once; each call runs the engine (synchronised) and returns seconds."""
        import time

        from polygraphy import cuda

        device_feed = {}
        for name, array in feed.items():
            buffer = cuda.DeviceArray(shape=array.shape, dtype=array.dtype)
            buffer.copy_from(np.ascontiguousarray(array))
            device_feed[name] = buffer
        self._staged.extend(device_feed.values())

        def once() -> float:
            start = time.perf_counter()
            self._runner.infer(feed_dict=device_feed, check_inputs=False, copy_outputs_to_host=False)
            return time.perf_counter() - start

        return once

    def close(self) -> None:
        for buffer in self._staged:
            buffer.free()
        self._staged.clear()
        self._runner.deactivate()


def cuda_device_name() -> str:
    """The GPU's name through PyTorch when it is installed, else a generic description."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return "CUDA device 0"


def profile_for_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    seq: int,
    max_seq: int | None = None,
    batch: int = 1,
    max_batch: int | None = None,
    min_shapes: Iterable[str] | None = None,
    opt_shapes: Iterable[str] | None = None,
    max_shapes: Iterable[str] | None = None,
) -> ShapeProfile:
    """:func:`derive_profile` for a model given by path (read without its weights) or in memory, with the
    explicit shapes as the CLI receives them (``input_ids:1x1`` strings)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return derive_profile(
        input_specs(model),
        seq=seq,
        max_seq=max_seq,
        batch=batch,
        max_batch=max_batch,
        min_shapes=parse_shapes(min_shapes),
        opt_shapes=parse_shapes(opt_shapes),
        max_shapes=parse_shapes(max_shapes),
    )
