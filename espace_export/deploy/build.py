"""Builders: turn an ONNX model into something that runs, behind one :class:`Runner` interface.

Backends (``--backend``):

- ``ort-cpu``: ONNX Runtime on the CPU (the default; ``onnxruntime``).
- ``ort-cuda``: ONNX Runtime's CUDA execution provider (``onnxruntime-gpu``, which replaces ``onnxruntime``).
- ``ort-tensorrt``: ONNX Runtime's TensorRT execution provider, FP16, with CUDA and CPU as fallbacks.
- ``tensorrt``: a TensorRT engine built by :func:`espace_export.deploy.tensorrt.build_engine`.
- ``torch-cuda``: FP16 GEMMs through PyTorch/cuBLAS; times GEMM shapes only (see :mod:`espace_export.deploy.profile`).

Every heavy backend is imported lazily; a missing one is an :class:`EspaceError` naming the extra."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from espace_export._optional import require_onnxruntime
from espace_export.deploy.tensorrt import (
    BuildPlan,
    EngineOptions,
    ShapeProfile,
    TensorRTRunner,
    build_engine,
    cuda_device_name,
    derive_profile,
)
from espace_export.errors import EspaceError
from espace_export.io.data import InputSpec, complete_feed, input_specs, vocab_size
from espace_export.io.models import (
    save_model,
)
from espace_export.runtime import ort_session

if TYPE_CHECKING:
    from espace_export.deploy.options import TritonOptions

GRAPH_BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")


GEMM_ONLY_BACKENDS = ("torch-cuda",)


BACKENDS = GRAPH_BACKENDS + GEMM_ONLY_BACKENDS


GPU_EXTRA = "pip uninstall -y onnxruntime && pip install 'espace-export[gpu]' (onnxruntime-gpu replaces onnxruntime)"


ProviderList = Sequence[str | tuple[str, dict[str, Any]]]


class Runner(Protocol):
    """One runnable model on one backend.

    ``run`` returns the outputs (host arrays, graph order) for correctness checks; ``prepare`` stages
    the inputs on the device once (ONNX Runtime also runs the model once there, to learn the output
    shapes: a first warm-up) and returns a callable that executes once, synchronised, and returns its
    duration in seconds: the unit the profiler times.
    """

    backend: str
    device: str

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def prepare(self, feed: Mapping[str, np.ndarray]) -> Callable[[], float]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BuildSettings:
    """Everything a builder may need; each backend reads its part.

    ``profile`` is required by ``tensorrt`` (the engine's optimisation profile) and used by
    ``ort-tensorrt`` (``trt_profile_*_shapes``); ``cache_dir`` keeps ONNX Runtime's TensorRT engines.
    """

    threads: int | None = None
    optimization: str = "all"
    profile: ShapeProfile | None = None
    engine: EngineOptions = EngineOptions()
    cache_dir: Path | None = None
    device_id: int = 0

    def __post_init__(self) -> None:
        threads = self.threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 4096
        ):
            raise EspaceError(
                f"--threads must lie between 0 (ONNX Runtime's default) and 4096, got {threads!r}", "try --threads 1"
            )
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise EspaceError(f"the device id must be at least 0, got {self.device_id!r}", "try --device-id 0")


# The longest prompt (batch × seq tokens) a build or profile run feeds: far past any model's context, and
# small enough that its int64 ids and masks (32 MiB each) never exhaust memory before the model runs.
MAX_PROMPT_TOKENS = 1 << 22


def check_prompt(seq: int, batch: int) -> None:
    """``--seq`` and ``--batch`` at least 1, and their product within :data:`MAX_PROMPT_TOKENS`."""
    for name, value in (("--seq", seq), ("--batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EspaceError(f"{name} must be at least 1, got {value!r}", "use a positive size")
    if seq * batch > MAX_PROMPT_TOKENS:
        raise EspaceError(
            f"--batch × --seq = {batch * seq} tokens exceeds {MAX_PROMPT_TOKENS}",
            "measure a prompt the model can take (its context length)",
        )


def check_backend(backend: str, *, graph: bool = False) -> None:
    allowed = GRAPH_BACKENDS if graph else BACKENDS
    if backend not in allowed:
        extra = " (torch-cuda times GEMM shapes only, not whole graphs)" if backend in GEMM_ONLY_BACKENDS else ""
        raise EspaceError(f"unknown backend {backend!r}{extra}", f"choose from {', '.join(allowed)}")


def ort_providers(backend: str, settings: BuildSettings | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    """The ONNX Runtime providers (with options) for an ``ort-*`` backend, most preferred first."""
    settings = settings or BuildSettings()
    cuda = ("CUDAExecutionProvider", {"device_id": settings.device_id})
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    if backend == "ort-tensorrt":
        options: dict[str, Any] = {
            "device_id": settings.device_id,
            "trt_fp16_enable": settings.engine.fp16,
        }
        if settings.engine.workspace_gib is not None:
            options["trt_max_workspace_size"] = int(settings.engine.workspace_gib * 2**30)
        if settings.engine.optimization_level is not None:
            options["trt_builder_optimization_level"] = settings.engine.optimization_level
        if settings.cache_dir is not None:
            options["trt_engine_cache_enable"] = True
            options["trt_engine_cache_path"] = str(settings.cache_dir)
            options["trt_timing_cache_enable"] = True
        if settings.profile is not None:
            shapes = settings.profile.as_strings()
            options["trt_profile_min_shapes"] = shapes["min"]
            options["trt_profile_opt_shapes"] = shapes["opt"]
            options["trt_profile_max_shapes"] = shapes["max"]
        return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]
    check_backend(backend, graph=True)
    raise EspaceError(f"{backend} is not an ONNX Runtime backend", "use ort-cpu, ort-cuda or ort-tensorrt")


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def require_providers(backend: str, providers: ProviderList) -> None:
    """Fail before building a session when this onnxruntime lacks the backend's first provider."""
    ort = require_onnxruntime(f"--backend {backend}")

    wanted = _provider_name(providers[0])
    if wanted not in ort.get_available_providers():
        raise EspaceError(
            f"--backend {backend} needs ONNX Runtime's {wanted}, which this onnxruntime {ort.__version__} does not "
            f"have (it has {', '.join(ort.get_available_providers())})",
            GPU_EXTRA,
        )


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores available"


class OrtRunner:
    """An ONNX Runtime session as a :class:`Runner`; ``prepare`` uses I/O binding with preallocated outputs,
    so a timed run pays neither input conversion nor output allocation."""

    def __init__(self, session: Any, backend: str, threads: int | None) -> None:
        self.session = session
        self.backend = backend
        self.providers: list[str] = list(session.get_providers())
        if backend == "ort-cpu":
            self.device = f"{cpu_description()}; ONNX Runtime intra-op threads: {threads or 'default (one per core)'}"
            self._device_type = "cpu"
        else:
            self.device = f"{cuda_device_name()}; providers {', '.join(self.providers)}"
            self._device_type = "cuda"
        self._outputs = [o.name for o in session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(self._outputs, dict(feed)))

    def prepare(self, feed: Mapping[str, np.ndarray]) -> Callable[[], float]:
        import onnxruntime as ort

        sample = self.run(feed)  # learns the output shapes (and warms the session once)
        binding = self.session.io_binding()
        for name, array in feed.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device_type, 0)
            binding.bind_ortvalue_input(name, value)
        for name, array in zip(self._outputs, sample, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self._device_type, 0)
            binding.bind_ortvalue_output(name, value)
        session = self.session

        def once() -> float:
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return time.perf_counter() - start

        return once

    def close(self) -> None:
        self.session = None


def build_runner(
    model: onnx.ModelProto | str | os.PathLike[str],
    backend: str = "ort-cpu",
    settings: BuildSettings | None = None,
) -> Runner:
    """Build ``model`` for ``backend`` and return it as a :class:`Runner`.

    A model given by path is read from that path (external data beside it works on every backend).

    Raises:
        EspaceError: an unknown backend, a missing extra, a provider ONNX Runtime silently dropped.
    """
    settings = settings or BuildSettings()
    check_backend(backend, graph=True)
    if backend == "tensorrt":
        if settings.profile is None:
            raise EspaceError(
                "a TensorRT engine needs an optimisation profile", "pass --seq or --min/--opt/--max-shapes"
            )
        if isinstance(model, onnx.ModelProto):
            with tempfile.TemporaryDirectory(prefix="espace-trt-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path)
                engine = build_engine(path, settings.profile, settings.engine)
        else:
            engine = build_engine(model, settings.profile, settings.engine)
        return TensorRTRunner(engine)
    providers = ort_providers(backend, settings)
    require_providers(backend, providers)
    session = ort_session(model, providers=providers, threads=settings.threads, optimization=settings.optimization)
    active = session.get_providers()
    wanted = _provider_name(providers[0])
    if not active or active[0] != wanted:
        raise EspaceError(
            f"ONNX Runtime could not start {wanted} and fell back to {', '.join(active)}",
            "check the CUDA/cuDNN (and TensorRT) libraries onnxruntime-gpu needs are on the library path",
        )
    return OrtRunner(session, backend, settings.threads)


# Operator domains ONNX Runtime implements (CPU and CUDA builds).
RUNTIME_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.training"})


def load_structure(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """A model's graph and weight metadata (external weights stay on disk), checked so that a runtime
    will not trip over it later: an :class:`EspaceError` for a missing, unreadable, truncated or empty
    model, external data that escapes its directory or is short, a graph ``onnx.checker`` rejects (a
    cycle: nodes out of topological order), or an operator of a domain ONNX Runtime does not implement."""
    from espace_export.io.models import check_external_data, check_model

    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"model not found: {path}", "check the path to the .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, ValueError, OSError: all "this is not a readable model"
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise EspaceError(
            f"{path} is not a readable ONNX model ({reason})", "the file may be truncated or not ONNX: copy it again"
        ) from None
    if len(model.graph.node) == 0:
        raise EspaceError(f"{path} has no graph (empty or not an ONNX model)", "pass the .onnx file itself")
    check_external_data(model, path.parent)
    check_model(path)
    foreign = next((n for n in _all_nodes(model.graph) if n.domain not in RUNTIME_DOMAINS), None)
    if foreign is not None:
        raise EspaceError(
            f"node {foreign.name or foreign.op_type!r} uses {foreign.domain}::{foreign.op_type}, a custom operator "
            "ONNX Runtime does not implement",
            "export the model with standard ONNX operators",
        )
    return model


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for sub in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
                nodes += _all_nodes(sub)
    return nodes


def synthetic_feed(model: onnx.ModelProto, *, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A prompt of ``seq`` random tokens per batch row, with masks/positions filled in the way exporters
    expect (:func:`espace_export.io.data.complete_feed`); float inputs get standard normals."""
    specs = input_specs(model)
    try:
        shapes = derive_profile(specs, seq=seq, batch=batch).shapes("opt")
    except EspaceError as exc:
        raise EspaceError(
            f"cannot make a prompt for this model: {exc.problem}",
            "this needs a model whose dynamic axes are batch and sequence",
        ) from None
    vocab = vocab_size(model) or 2
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        if _is_token_input(spec):
            feed[spec.name] = rng.integers(0, vocab, size=shapes[spec.name]).astype(spec.dtype)
        elif not spec.is_integer:
            feed[spec.name] = rng.standard_normal(shapes[spec.name]).astype(spec.dtype)
    return complete_feed(feed, specs)


def _is_token_input(spec: InputSpec) -> bool:
    return spec.is_integer and len(spec.shape) == 2 and ("input_ids" in spec.name or spec.name in ("ids", "tokens"))


@dataclass
class BuildResult:
    """What :func:`build_model` made: where the engine and the Triton repository went, and a first run."""

    backend: str
    device: str
    first_run_ms: float
    profile: ShapeProfile | None = None
    plan: BuildPlan | None = None
    engine: Path | None = None
    triton: Path | None = None


def build_model(
    model: str | os.PathLike[str],
    backend: str = "ort-cpu",
    settings: BuildSettings | None = None,
    *,
    seq: int = 512,
    batch: int = 1,
    save_engine: str | os.PathLike[str] | None = None,
    triton: TritonOptions | None = None,
    on_plan: Callable[[BuildPlan], None] | None = None,
) -> BuildResult:
    """Build ``model`` for ``backend``, run it once on a prompt of ``seq`` tokens, and optionally save
    the TensorRT engine and write a Triton model repository (``triton.triton_repo``).

    ``settings.profile`` is the TensorRT optimisation profile (``tensorrt`` and ``ort-tensorrt``);
    when None it is derived from the model's inputs with ``seq`` and ``batch``
    (:func:`espace_export.deploy.tensorrt.derive_profile`).

    Raises:
        EspaceError: bad options, a missing extra, an existing Triton model without ``overwrite``,
            or a build the backend refused.
    """
    settings = settings or BuildSettings()
    model = Path(model)
    repo = triton.triton_repo if triton is not None else None
    _check_build(model, backend, (seq, batch), save_engine, triton)
    structure = load_structure(model)
    if settings.profile is None and backend in ("tensorrt", "ort-tensorrt"):
        settings = replace(settings, profile=derive_profile(input_specs(structure), seq=seq, batch=batch))
    if backend == "tensorrt" and triton is not None and repo is not None:
        _check_engine_batch(settings.profile, triton.max_batch_size)
    plans: list[BuildPlan] = []

    def remember(plan: BuildPlan) -> None:
        plans.append(plan)
        if on_plan is not None:
            on_plan(plan)

    engine_path: Path | None = None
    engine: bytes | None = None
    if backend == "tensorrt":
        assert settings.profile is not None
        if save_engine is None and repo is None:
            save_engine = model.with_suffix(".plan")
        engine = build_engine(model, settings.profile, settings.engine, save_engine=save_engine, on_plan=remember)
        engine_path = Path(save_engine) if save_engine is not None else None
        runner: Runner = TensorRTRunner(engine)
    else:
        runner = build_runner(model, backend, settings)
    first_run_ms = runner.prepare(synthetic_feed(structure, batch=batch, seq=seq))() * 1e3
    device = runner.device
    runner.close()
    return BuildResult(
        backend=backend,
        device=device,
        first_run_ms=first_run_ms,
        profile=settings.profile,
        plan=plans[0] if plans else None,
        engine=engine_path,
        triton=_write_triton(model, backend, engine, triton) if triton is not None and repo is not None else None,
    )


def _check_build(
    model: Path,
    backend: str,
    prompt: tuple[int, int],
    save_engine: str | os.PathLike[str] | None,
    triton: TritonOptions | None,
) -> None:
    """What :func:`build_model` can tell before reading the model: backend, paths, an existing Triton model."""
    from espace_export.deploy.serving import model_name

    check_backend(backend, graph=True)
    check_prompt(*prompt)
    if not model.is_file():
        raise EspaceError(f"model not found: {model}", "check the path to the .onnx file")
    if save_engine is not None and backend != "tensorrt":
        raise EspaceError("--save-engine writes TensorRT engines", "add --backend tensorrt, or drop --save-engine")
    if triton is not None and triton.triton_repo is not None:
        target = Path(triton.triton_repo) / (triton.triton_name or model_name(model))
        if target.exists() and not triton.overwrite:
            raise EspaceError(f"{target} already exists", "pass --overwrite to replace it, or choose --triton-name")


def _check_engine_batch(profile: ShapeProfile | None, max_batch_size: int) -> None:
    """Triton's ``max_batch_size`` must fit the engine's largest batch (its profile's maximum)."""
    if max_batch_size <= 0 or profile is None:
        return
    engine_batch = min((entry.max[0] for entry in profile.inputs if entry.max), default=0)
    if max_batch_size > engine_batch:
        raise EspaceError(
            f"--max-batch-size {max_batch_size} exceeds the engine's largest batch ({engine_batch})",
            f"raise --max-batch to {max_batch_size} or lower --max-batch-size",
        )


def _write_triton(model: Path, backend: str, engine: bytes | None, triton: TritonOptions) -> Path:
    from espace_export.deploy.serving import write_triton_repo

    assert triton.triton_repo is not None
    return write_triton_repo(
        triton.triton_repo,
        model,
        engine=engine,
        name=triton.triton_name,
        version=triton.triton_version,
        max_batch_size=triton.max_batch_size,
        instance=triton.triton_instance or ("cpu" if backend == "ort-cpu" else "gpu"),
        overwrite=triton.overwrite,
    )
