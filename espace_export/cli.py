"""The ``espace-export`` command line: parses, calls the library, prints. Nothing else.

``espace-export model.onnx --ratio 0.5`` is short for ``espace-export compress model.onnx --ratio 0.5``.
"""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from espace_export import __version__
from espace_export.errors import EspaceError

app = typer.Typer(
    name="espace-export",
    help="Compress transformer ONNX models with ESPACE activation projections (NeurIPS 2024) and deploy them.\n\n"
    "Run `espace-export MODEL.onnx --ratio 0.5` (short for `espace-export compress ...`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Candidate(str, Enum):
    mse = "mse"
    nmse = "nmse"
    go_mse = "go-mse"
    go_mse_l2 = "go-mse-l2"
    nl_mse = "nl-mse"
    nl_mse_l2 = "nl-mse-l2"


class Method(str, Enum):
    mse = "mse"
    nmse = "nmse"
    go_mse = "go-mse"
    go_mse_l2 = "go-mse-l2"
    nl_mse = "nl-mse"
    nl_mse_l2 = "nl-mse-l2"
    best = "best"
    svd = "svd"
    asvd = "asvd"
    whitened_svd = "whitened-svd"
    auto = "auto"


class Select(str, Enum):
    none = "none"
    validate = "validate"
    proxy = "proxy"


class Stop(str, Enum):
    ratio = "ratio"
    knee = "knee"


_SELECT = "Selection"
MethodOption = Annotated[
    Method | None,
    typer.Option(
        help="best: the six candidates, best per layer; svd/asvd/whitened-svd: baselines; auto: six + whitened-svd "
        "[default: --candidate].",
        rich_help_panel=_SELECT,
    ),
]
SelectOption = Annotated[
    Select,
    typer.Option(
        help="none: every layer at --ratio; validate: score each layer x method on validation batches, then apply "
        "progressively to --ratio; proxy: same, scored by the calibrated output error (no extra passes).",
        rich_help_panel=_SELECT,
    ),
]
LayerRatioOption = Annotated[
    float | None,
    typer.Option(
        help="With selection: compression of each chosen layer [default: max(ratio, 0.5)].", rich_help_panel=_SELECT
    ),
]
MaxLayerLossOption = Annotated[
    float | None,
    typer.Option(
        help="Skip layers whose alone loss increase exceeds this (relative; paper 0.02).", rich_help_panel=_SELECT
    ),
]
StopOption = Annotated[Stop, typer.Option(help="Stop at --ratio or at the curve's knee.", rich_help_panel=_SELECT)]
ValidTextOption = Annotated[
    str | None,
    typer.Option(
        help="Validation text for --select validate (default: part of the calibration batches).",
        rich_help_panel=_SELECT,
    ),
]
ValidDataOption = Annotated[
    Path | None, typer.Option(help="Validation .npz for --select validate.", rich_help_panel=_SELECT)
]
CurveOption = Annotated[
    Path | None,
    typer.Option(help="Write the loss-vs-compression curve here (.json and .png).", rich_help_panel=_SELECT),
]


class ValidLoss(str, Enum):
    auto = "auto"
    next_token = "next-token"
    kl = "kl"
    distill = "distill"


class Siblings(str, Enum):
    separate = "separate"
    shared = "shared"


class Precision(str, Enum):
    float32 = "float32"
    float64 = "float64"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"espace-export {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Compress transformer ONNX models with ESPACE."""


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="The exported transformer (.onnx; external data beside it is fine).")],
    ratio: Annotated[
        float, typer.Option("--ratio", "-r", help="Target compression of the targeted weights, in (0, 1).")
    ] = 0.5,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Compressed model path [default: MODEL.espace.onnx]."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="JSON report path [default: OUTPUT.report.json; a .md twin is written too]."),
    ] = None,
    calib_data: Annotated[
        Path | None,
        typer.Option(
            help="Calibration inputs: .npz of arrays keyed by model input name.",
            rich_help_panel="Calibration",
        ),
    ] = None,
    calib_text: Annotated[
        str | None,
        typer.Option(
            help="Calibration text file (or builtin:pydoc for CPython's docs); needs --tokenizer.",
            rich_help_panel="Calibration",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="HuggingFace tokenizer directory for --calib-text.", rich_help_panel="Calibration"),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per calibration batch.", rich_help_panel="Calibration")
    ] = 4,
    seq_len: Annotated[
        int,
        typer.Option(help="Tokens per sequence (text and random sources).", rich_help_panel="Calibration"),
    ] = 128,
    num_batches: Annotated[
        int,
        typer.Option(help="Calibration batches to use (held-out ones included).", rich_help_panel="Calibration"),
    ] = 16,
    holdout: Annotated[
        float,
        typer.Option(help="Fraction of batches held out to measure output fidelity.", rich_help_panel="Calibration"),
    ] = 0.25,
    stats_precision: Annotated[
        Precision,
        typer.Option(help="Dtype of each batch's XᵀX (sums are float64).", rich_help_panel="Calibration"),
    ] = Precision.float32,
    seed: Annotated[int, typer.Option(help="Seed for random calibration ids.", rich_help_panel="Calibration")] = 0,
    candidate: Annotated[
        Candidate, typer.Option(help="Projection candidate (paper §3).", rich_help_panel="Projection")
    ] = Candidate.mse,
    rank_rule: Annotated[
        str,
        typer.Option(
            help="pow2 (paper, tensor cores) or a granularity such as 16 or 64.", rich_help_panel="Projection"
        ),
    ] = "pow2",
    min_rank: Annotated[
        int,
        typer.Option(help="Layers whose rank would fall below this stay dense.", rich_help_panel="Projection"),
    ] = 16,
    rank: Annotated[
        int | None,
        typer.Option(help="Force this rank L on every layer (L >= K: exact rewrite).", rich_help_panel="Projection"),
    ] = None,
    siblings: Annotated[
        Siblings,
        typer.Option(
            help="Layers reading one activation (Q/K/V, gate/up): one projection each, or one shared (fitted and "
            "ranked as their fused GEMM, like the paper's fused QKV).",
            rich_help_panel="Projection",
        ),
    ] = Siblings.shared,
    include_heads: Annotated[
        bool,
        typer.Option(help="Also compress LM head / pooler / embedding projections.", rich_help_panel="Projection"),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Regex of layer names to keep dense (repeatable).", rich_help_panel="Projection"),
    ] = None,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Store weights in OUTPUT.data [default: only past 2 GB].",
        ),
    ] = None,
    method: MethodOption = None,
    select: SelectOption = Select.none,
    layer_ratio: LayerRatioOption = None,
    max_layer_loss: MaxLayerLossOption = None,
    stop: StopOption = Stop.ratio,
    valid_text: ValidTextOption = None,
    valid_data: ValidDataOption = None,
    curve: CurveOption = None,
    valid_loss: Annotated[
        ValidLoss,
        typer.Option(
            help="What --select validate scores: auto = distance to the original model (kl: KL of the next-token "
            "distribution for causal LMs; distill: 1 - cosine of the outputs otherwise); next-token: validation "
            "cross-entropy (the paper's perplexity).",
            rich_help_panel=_SELECT,
        ),
    ] = ValidLoss.auto,
    statistics: Annotated[
        Path | None, typer.Option(help="Also write the calibration statistics (.npz).", rich_help_panel=_SELECT)
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="Also write the plan (.json + .npz).", rich_help_panel=_SELECT)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the JSON report to stdout instead of tables.")
    ] = False,
    stage: Annotated[str, typer.Option(hidden=True)] = "apply",
    statistics_in: Annotated[Path | None, typer.Option(hidden=True)] = None,
    plan_in: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Calibrate ESPACE projections and write a compressed ONNX model plus a report."""
    from espace_export.pipeline import compress as run_compress

    result = run_compress(
        model,
        method=method.value if method else None,
        select=select.value,
        layer_ratio=layer_ratio,
        max_layer_loss=max_layer_loss,
        stop=stop.value,
        valid_text=valid_text,
        valid_data=valid_data,
        curve_path=curve,
        statistics=statistics,
        plan_path=plan,
        stage=stage,
        statistics_in=statistics_in,
        plan_in=plan_in,
        siblings=siblings.value,
        validation_loss=valid_loss.value,
        ratio=ratio,
        output=output,
        report_path=report,
        calib_data=calib_data,
        calib_text=calib_text,
        tokenizer=tokenizer,
        batch_size=batch_size,
        seq_len=seq_len,
        num_batches=num_batches,
        holdout=holdout,
        candidate=candidate.value,
        rank_rule=rank_rule,
        min_rank=min_rank,
        rank=rank,
        include_heads=include_heads,
        exclude=exclude or (),
        stats_precision=stats_precision.value,
        external_data=external_data,
        seed=seed,
        progress=not (quiet or json_out) and sys.stderr.isatty(),
    )
    if stage != "apply":
        import json

        typer.echo(json.dumps(result.report, indent=2) if json_out else f"wrote {result.output}")
        return
    _emit(result.report, quiet=quiet, json_out=json_out)
    if not (quiet or json_out):
        typer.echo(f"wrote {result.output} and {result.report_path}")


def _forward(ctx: typer.Context, model: Path, extra: list[str]) -> None:
    """Run ``compress`` with ``extra`` options (the staged commands share its options and validation)."""
    from typer.main import get_command

    command = get_command(app).get_command(ctx, "compress")  # type: ignore[attr-defined]
    assert command is not None
    command.main(args=[str(model), *extra, *ctx.args], prog_name="espace-export compress", standalone_mode=False)


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_PASS_THROUGH)
def calibrate(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The exported transformer (.onnx).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Statistics file (.npz) to write.")],
) -> None:
    """Stage 1: collect activation (and, for nl-mse, gradient) statistics. Takes compress's calibration
    options (--calib-text, --tokenizer, --num-batches, --method, ...)."""
    _forward(ctx, model, ["--stage", "calibrate", "--statistics", str(output)])


@app.command(context_settings=_PASS_THROUGH)
def plan(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The exported transformer (.onnx).")],
    statistics: Annotated[Path, typer.Option(help="Statistics from `espace-export calibrate`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Plan to write (.json; factors in .npz beside it).")],
) -> None:
    """Stage 2: decide per layer (method, rank, selected) from saved statistics. Takes compress's selection
    options (--ratio, --method, --select, --max-layer-loss, --valid-text, --curve, ...)."""
    _forward(ctx, model, ["--stage", "plan", "--statistics-in", str(statistics), "--plan", str(output)])


@app.command(context_settings=_PASS_THROUGH)
def apply(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="The exported transformer (.onnx) the plan was made for.")],
    plan_file: Annotated[Path, typer.Option("--plan", help="Plan from `espace-export plan`.")],
) -> None:
    """Stage 3: rewrite the model by a plan (rejected if made for other weights) and write it with a report.
    Takes compress's output options (-o, --report, --external-data, and data for the fidelity check)."""
    _forward(ctx, model, ["--plan-in", str(plan_file)])


class Backend(str, Enum):
    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    ort_tensorrt = "ort-tensorrt"
    tensorrt = "tensorrt"
    torch_cuda = "torch-cuda"


class GraphBackend(str, Enum):
    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    ort_tensorrt = "ort-tensorrt"
    tensorrt = "tensorrt"


class Optimization(str, Enum):
    none = "none"
    basic = "basic"
    extended = "extended"
    all = "all"


class GemmDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class Instance(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


_ENGINE = "TensorRT engine"
_TRITON = "Triton"


@app.command()
def profile(
    original: Annotated[Path, typer.Argument(help="The model before compression (.onnx).")],
    compressed: Annotated[Path, typer.Argument(help="The model `espace-export compress` wrote from it.")],
    backend: Annotated[
        Backend, typer.Option(help="Where to time: ONNX Runtime, TensorRT, or FP16 GEMMs in PyTorch/cuBLAS.")
    ] = Backend.ort_cpu,
    ttft_backend: Annotated[
        GraphBackend | None,
        typer.Option(help="Backend for TTFT (default: --backend; torch-cuda times GEMMs only)."),
    ] = None,
    seq: Annotated[int, typer.Option(help="Prompt length: GEMMs run at M = batch × seq.")] = 512,
    batch: Annotated[int, typer.Option(help="Prompts per prefill (TTFT is defined at 1).")] = 1,
    warmup: Annotated[int, typer.Option(help="Untimed runs of each side first.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs of each side, interleaved.")] = 10,
    gemm: Annotated[bool, typer.Option("--gemm/--no-gemm", help="Time the GEMMs layer by layer.")] = True,
    ttft: Annotated[bool, typer.Option("--ttft/--no-ttft", help="Time the whole prefill.")] = True,
    gemm_dtype: Annotated[
        GemmDtype | None, typer.Option(help="GEMM operand dtype (default: float32 on ort-cpu, float16 on GPUs).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: one per core).")] = None,
    optimization: Annotated[
        Optimization, typer.Option(help="ONNX Runtime graph optimisation level.")
    ] = Optimization.all,
    fp16: Annotated[
        bool, typer.Option("--fp16/--no-fp16", help="FP16 kernels on tensorrt/ort-tensorrt.", rich_help_panel=_ENGINE)
    ] = True,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="JSON report (default: COMPRESSED.profile.json; .md and .png beside it)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout.")] = False,
) -> None:
    """Time GEMMs and time-to-first-token of COMPRESSED against ORIGINAL, interleaved, on one backend."""
    from espace_export.build import BuildSettings
    from espace_export.engines import EngineOptions
    from espace_export.profile import ProfileSettings, headline
    from espace_export.profile import profile as run_profile

    settings = ProfileSettings(
        backend=backend.value,
        ttft_backend=ttft_backend.value if ttft_backend else None,
        seq=seq,
        batch=batch,
        warmup=warmup,
        repeats=repeats,
        gemm=gemm,
        ttft=ttft,
        gemm_dtype=gemm_dtype.value if gemm_dtype else None,
        build=BuildSettings(threads=threads, optimization=optimization.value, engine=EngineOptions(fp16=fp16)),
    )
    log = None if (quiet or json_out) else (lambda line: typer.echo(line, err=True))
    result = run_profile(original, compressed, settings, output=output, log=log)
    if json_out:
        import json

        typer.echo(json.dumps(result.report, indent=2))
        return
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ESPACE latency ({result.report['backend']}, M = {result.report['M']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in headline(result.report):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for note in result.report["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in result.paths.values())}")


@app.command()
def check(
    current: Annotated[Path, typer.Argument(help="The profile report to judge (JSON from `espace-export profile`).")],
    baseline: Annotated[Path, typer.Option(help="The accepted profile report to compare against.")],
    max_regression: Annotated[
        float, typer.Option(help="Largest allowed relative worsening of a metric (0.05 = 5%).")
    ] = 0.05,
    absolute: Annotated[
        bool, typer.Option("--absolute", help="Also gate the absolute medians (same machine only).")
    ] = False,
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Compare reports measured with other backend/seq/batch.")
    ] = False,
    summary: Annotated[
        Path | None, typer.Option(help="Also write the table as Markdown here (e.g. $GITHUB_STEP_SUMMARY).")
    ] = None,
) -> None:
    """CI gate: exit 1 with a table of what regressed beyond --max-regression, 0 otherwise."""
    from rich.console import Console
    from rich.table import Table

    from espace_export.gate import compare, load_report, table_rows, to_markdown

    result = compare(
        load_report(current),
        load_report(baseline),
        max_regression=max_regression,
        absolute=absolute,
        allow_mismatch=allow_mismatch,
    )
    verdict = "passed" if result.passed else f"FAILED: {len(result.failures)} metric(s) regressed"
    table = Table(title=f"ESPACE latency gate (max regression {max_regression:.1%}): {verdict}")
    for column in ("metric", "baseline", "current", "change", "status"):
        table.add_column(column, justify="left" if column in ("metric", "status") else "right")
    styles = {"regressed": "bold red", "missing": "bold red", "improved": "green"}
    for row in table_rows(result):
        table.add_row(*row, style=styles.get(row[-1]))
    Console().print(table)
    if summary is not None:
        with summary.open("a", encoding="utf-8") as handle:  # appended: CI summaries collect several steps
            handle.write(to_markdown(result))
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model to build (external data beside it is fine).")],
    backend: Annotated[GraphBackend, typer.Option(help="What to build for.")] = GraphBackend.ort_cpu,
    seq: Annotated[
        int, typer.Option(help="Typical prompt length: the profile's opt sequence, and the test run's.")
    ] = 512,
    max_seq: Annotated[
        int | None, typer.Option(help="Longest sequence the engine accepts (default: --seq).", rich_help_panel=_ENGINE)
    ] = None,
    batch: Annotated[int, typer.Option(help="Typical batch: the profile's opt batch.")] = 1,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch the engine accepts (default: --batch).", rich_help_panel=_ENGINE)
    ] = None,
    min_shapes: Annotated[
        list[str] | None,
        typer.Option(help="Explicit profile minimum, e.g. input_ids:1x1 (repeatable).", rich_help_panel=_ENGINE),
    ] = None,
    opt_shapes: Annotated[
        list[str] | None, typer.Option(help="Explicit profile optimum, e.g. input_ids:1x512.", rich_help_panel=_ENGINE)
    ] = None,
    max_shapes: Annotated[
        list[str] | None, typer.Option(help="Explicit profile maximum, e.g. input_ids:1x2048.", rich_help_panel=_ENGINE)
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="FP16 kernels.", rich_help_panel=_ENGINE)] = True,
    strongly_typed: Annotated[
        bool | None,
        typer.Option(
            "--strongly-typed/--no-strongly-typed",
            help="Network typing (default: from the model and TensorRT version).",
            rich_help_panel=_ENGINE,
        ),
    ] = None,
    workspace_gib: Annotated[
        float | None, typer.Option(help="Builder workspace limit in GiB.", rich_help_panel=_ENGINE)
    ] = None,
    builder_optimization_level: Annotated[
        int | None, typer.Option(help="TensorRT builder optimisation level 0-5.", rich_help_panel=_ENGINE)
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache file (read and updated).", rich_help_panel=_ENGINE)
    ] = None,
    save_engine: Annotated[
        Path | None,
        typer.Option(help="Write the TensorRT engine here (default: MODEL.plan).", rich_help_panel=_ENGINE),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="ONNX Runtime TensorRT provider engine cache (ort-tensorrt).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="TensorRT's verbose log.")] = False,
    triton_repo: Annotated[
        Path | None, typer.Option(help="Write a Triton model repository here.", rich_help_panel=_TRITON)
    ] = None,
    triton_name: Annotated[
        str | None, typer.Option(help="Model name in the repository (default: from MODEL).", rich_help_panel=_TRITON)
    ] = None,
    triton_version: Annotated[int, typer.Option(help="Version folder.", rich_help_panel=_TRITON)] = 1,
    max_batch_size: Annotated[
        int,
        typer.Option(
            help="Triton max_batch_size (0: no batching; dims carry the batch axis).", rich_help_panel=_TRITON
        ),
    ] = 0,
    triton_instance: Annotated[
        Instance | None,
        typer.Option(help="instance_group kind (default: cpu for ort-cpu, else gpu).", rich_help_panel=_TRITON),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing model in the repository.", rich_help_panel=_TRITON)
    ] = False,
) -> None:
    """Build MODEL for a backend (ONNX Runtime session or TensorRT engine), test-run it, write a Triton repo."""
    from espace_export.build import BuildSettings, build_model
    from espace_export.engines import EngineOptions, profile_for_model

    profile_shapes = None
    if backend in (GraphBackend.tensorrt, GraphBackend.ort_tensorrt):
        profile_shapes = profile_for_model(
            model,
            seq=seq,
            max_seq=max_seq,
            batch=batch,
            max_batch=max_batch,
            min_shapes=min_shapes,
            opt_shapes=opt_shapes,
            max_shapes=max_shapes,
        )
    elif min_shapes or opt_shapes or max_shapes or max_seq or max_batch:
        raise EspaceError("shape profiles apply to TensorRT", "add --backend tensorrt or ort-tensorrt")
    settings = BuildSettings(
        threads=threads,
        profile=profile_shapes,
        cache_dir=cache_dir,
        engine=EngineOptions(
            fp16=fp16,
            strongly_typed=strongly_typed,
            workspace_gib=workspace_gib,
            optimization_level=builder_optimization_level,
            timing_cache=timing_cache,
            verbose=verbose,
        ),
    )

    def show_plan(plan: Any) -> None:
        typer.echo(
            f"TensorRT {plan.trt_major}: {'strongly' if plan.strongly_typed else 'weakly'} typed, "
            f"flags [{', '.join(plan.builder_flags)}], precision {plan.precision}",
            err=True,
        )
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)

    result = build_model(
        model,
        backend.value,
        settings,
        seq=seq,
        batch=batch,
        save_engine=save_engine,
        triton_repo=triton_repo,
        triton_name=triton_name,
        triton_version=triton_version,
        max_batch_size=max_batch_size,
        triton_instance=triton_instance.value if triton_instance else None,
        overwrite=overwrite,
        on_plan=show_plan,
    )
    if result.profile is not None:
        for which, shapes in result.profile.as_strings().items():
            typer.echo(f"profile {which}: {shapes}")
    typer.echo(f"{result.backend} on {result.device}: first run at seq {seq} took {result.first_run_ms:.3g} ms")
    if result.engine is not None:
        typer.echo(f"wrote {result.engine}")
    if result.triton is not None:
        typer.echo(f"wrote Triton model {result.triton}")


def _emit(report: dict[str, Any], *, quiet: bool, json_out: bool) -> None:
    if json_out:
        import json

        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        from espace_export.report import print_summary

        print_summary(report)


def _format_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"


def _terminate_like_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed and earlier outputs stay intact."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs its own errors to stderr; the CLI reports them once, as one line."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps EspaceError to one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        command.name or (command.callback.__name__ if command.callback else "") for command in app.registered_commands
    }
    if args and not args[0].startswith("-") and args[0] not in commands:
        args.insert(0, "compress")
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    _quiet_onnxruntime()
    _terminate_like_interrupt()
    try:
        # standalone mode: typer/click print usage errors their usual way (exit 2) and map Ctrl-C to exit 1
        app(args=args, prog_name="espace-export", standalone_mode=True)
    except EspaceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
