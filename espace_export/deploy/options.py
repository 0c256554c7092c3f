"""The options of ``build`` and ``profile``: frozen dataclasses whose field metadata is the command line.

As for compression (:mod:`espace_export.options`), each option is declared once, here: ``cli/groups.py`` turns
the fields into typer options (flags, help, panel, choices), and the command hands the parsed values back as
one of these objects. :class:`BuildOptions` and :class:`TritonOptions` are ``build``'s two groups,
:class:`ProfileOptions` is ``profile``'s; each turns itself into the library's settings
(:class:`~espace_export.deploy.build.BuildSettings`, :class:`~espace_export.deploy.profile.ProfileSettings`).

>>> ProfileOptions(backend="ort-cpu", repeats=20, target_interval=0.02).settings().max_repeats
200
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from espace_export.deploy.build import BACKENDS, GRAPH_BACKENDS, BuildSettings
from espace_export.deploy.profile import GEMM_DTYPES, ProfileSettings
from espace_export.deploy.serving import INSTANCE_KINDS
from espace_export.deploy.tensorrt import EngineOptions, ShapeProfile, profile_for_model
from espace_export.errors import EspaceError
from espace_export.options import option
from espace_export.runtime import OPTIMIZATION_LEVELS

_ENGINE = "TensorRT engine"
_TRITON = "Triton"


Options = TypeVar("Options")


def from_settings(cls: type[Options], settings: dict[str, Any]) -> Options:
    """``cls`` from the parsed options of a command that has several groups (its own fields picked out)."""
    return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})  # type: ignore[arg-type]


@dataclass(frozen=True)
class BuildOptions:
    """What to build for, the engine's shape profile and precision, and the ONNX Runtime session."""

    backend: str = option("ort-cpu", "What to build for.", choices=GRAPH_BACKENDS)
    seq: int = option(512, "Typical prompt length: the profile's opt sequence, and the test run's.")
    max_seq: int | None = option(None, "Longest sequence the engine accepts (default: --seq).", panel=_ENGINE)
    batch: int = option(1, "Typical batch: the profile's opt batch.")
    max_batch: int | None = option(None, "Largest batch the engine accepts (default: --batch).", panel=_ENGINE)
    min_shapes: tuple[str, ...] = option(
        (), "Explicit profile minimum, e.g. input_ids:1x1 (repeatable).", panel=_ENGINE, multiple=True
    )
    opt_shapes: tuple[str, ...] = option(
        (), "Explicit profile optimum, e.g. input_ids:1x512.", panel=_ENGINE, multiple=True
    )
    max_shapes: tuple[str, ...] = option(
        (), "Explicit profile maximum, e.g. input_ids:1x2048.", panel=_ENGINE, multiple=True
    )
    fp16: bool = option(True, "FP16 kernels.", "--fp16/--no-fp16", panel=_ENGINE)
    strongly_typed: bool | None = option(
        None,
        "Network typing (default: from the model and TensorRT version).",
        "--strongly-typed/--no-strongly-typed",
        panel=_ENGINE,
    )
    workspace_gib: float | None = option(None, "Builder workspace limit in GiB.", panel=_ENGINE)
    builder_optimization_level: int | None = option(None, "TensorRT builder optimisation level 0-5.", panel=_ENGINE)
    timing_cache: Path | None = option(None, "TensorRT timing cache file (read and updated).", panel=_ENGINE)
    save_engine: Path | None = option(None, "Write the TensorRT engine here (default: MODEL.plan).", panel=_ENGINE)
    cache_dir: Path | None = option(None, "ONNX Runtime TensorRT provider engine cache (ort-tensorrt).")
    threads: int | None = option(None, "ONNX Runtime intra-op threads.")
    verbose: bool = option(False, "TensorRT's verbose log.", "--verbose")

    def engine(self) -> EngineOptions:
        return EngineOptions(
            fp16=self.fp16,
            strongly_typed=self.strongly_typed,
            workspace_gib=self.workspace_gib,
            optimization_level=self.builder_optimization_level,
            timing_cache=self.timing_cache,
            verbose=self.verbose,
        )

    def shape_profile(self, model: Path) -> ShapeProfile | None:
        """The TensorRT optimisation profile for ``model`` (None for the other backends, which take none)."""
        if self.backend in ("tensorrt", "ort-tensorrt"):
            return profile_for_model(
                model,
                seq=self.seq,
                max_seq=self.max_seq,
                batch=self.batch,
                max_batch=self.max_batch,
                min_shapes=self.min_shapes,
                opt_shapes=self.opt_shapes,
                max_shapes=self.max_shapes,
            )
        if (
            self.min_shapes
            or self.opt_shapes
            or self.max_shapes
            or self.max_seq is not None
            or self.max_batch is not None
        ):
            raise EspaceError("shape profiles apply to TensorRT", "add --backend tensorrt or ort-tensorrt")
        return None

    def settings(self, model: Path) -> BuildSettings:
        return BuildSettings(
            threads=self.threads, profile=self.shape_profile(model), cache_dir=self.cache_dir, engine=self.engine()
        )


@dataclass(frozen=True)
class TritonOptions:
    """Where and how ``build`` writes a Triton model repository (``triton_repo=None``: it writes none)."""

    triton_repo: Path | None = option(None, "Write a Triton model repository here.", panel=_TRITON)
    triton_name: str | None = option(None, "Model name in the repository (default: from MODEL).", panel=_TRITON)
    triton_version: int = option(1, "Version folder.", panel=_TRITON)
    max_batch_size: int = option(0, "Triton max_batch_size (0: no batching; dims carry the batch axis).", panel=_TRITON)
    triton_instance: str | None = option(
        None, "instance_group kind (default: cpu for ort-cpu, else gpu).", panel=_TRITON, choices=tuple(INSTANCE_KINDS)
    )
    overwrite: bool = option(False, "Replace an existing model in the repository.", "--overwrite", panel=_TRITON)


@dataclass(frozen=True)
class ProfileOptions:
    """How ``profile`` measures: backend(s), sizes, rounds, and the session or engine it times."""

    backend: str = option(
        "ort-cpu", "Where to time: ONNX Runtime, TensorRT, or FP16 GEMMs in PyTorch/cuBLAS.", choices=BACKENDS
    )
    ttft_backend: str | None = option(
        None, "Backend for TTFT (default: --backend; torch-cuda times GEMMs only).", choices=GRAPH_BACKENDS
    )
    seq: int = option(512, "Prompt length: GEMMs run at M = batch × seq.")
    batch: int = option(1, "Prompts per prefill (TTFT is defined at 1).")
    warmup: int = option(2, "Untimed runs of each side first.")
    repeats: int = option(10, "Timed runs of each side, interleaved.")
    target_interval: float | None = option(
        None,
        "After --repeats rounds, add rounds until the 95 % interval of each ratio is within ± this fraction "
        "of it (e.g. 0.02), or --max-repeats rounds (default: exactly --repeats rounds).",
    )
    max_repeats: int = option(200, "Most timed rounds with --target-interval.")
    gemm: bool = option(True, "Time the GEMMs layer by layer.", "--gemm/--no-gemm")
    ttft: bool = option(True, "Time the whole prefill.", "--ttft/--no-ttft")
    gemm_dtype: str | None = option(
        None, "GEMM operand dtype (default: float32 on ort-cpu, float16 on GPUs).", choices=GEMM_DTYPES
    )
    threads: int | None = option(None, "ONNX Runtime intra-op threads (default: one per core).")
    optimization: str = option("all", "ONNX Runtime graph optimisation level.", choices=OPTIMIZATION_LEVELS)
    fp16: bool = option(True, "FP16 kernels on tensorrt/ort-tensorrt.", "--fp16/--no-fp16", panel=_ENGINE)

    def settings(self) -> ProfileSettings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        build = BuildSettings(
            threads=values.pop("threads"),
            optimization=values.pop("optimization"),
            engine=EngineOptions(fp16=values.pop("fp16")),
        )
        return ProfileSettings(**values, build=build)
