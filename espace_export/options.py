"""The options of a compression run: one frozen dataclass per concern, validated once where it is built.

``CompressOptions`` composes four groups — where the data comes from (:class:`DataOptions`), how much each
layer is compressed (:class:`RankOptions`), how methods and layers are chosen (:class:`SelectionOptions`) and
what is written (:class:`OutputOptions`). Each field carries its command-line help in its metadata, so the
CLI builds its option groups from these classes (Polygraphy's argument groups): an option is declared here
once, and ``compress``, ``calibrate``, ``plan`` and ``apply`` share it.

>>> options = CompressOptions.from_settings(ratio=0.3, calib_text="builtin:pydoc", method="auto", select="proxy")
>>> options.ranks.ratio, options.selection.methods[-1]
(0.3, 'oblique')
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from espace_export.errors import EspaceError
from espace_export.io.data import BUILTIN_TEXTS, check_calibration_sizes, compile_patterns, is_builtin_text
from espace_export.selection.candidates import CANDIDATES, EIG_PRECISIONS, EIGEN_SOLVERS
from espace_export.selection.factorizations import AUTO_METHODS, METHODS
from espace_export.selection.planner import GRADIENT_METHODS
from espace_export.selection.ranks import SIBLING_MODES, check_ratio, check_siblings, parse_rank_rule
from espace_export.selection.validation import VALIDATION_LOSSES

METHOD_CHOICES = (*METHODS, "best", "auto")
SELECT_MODES = ("none", "validate", "fisher", "proxy")
STOP_RULES = ("ratio", "knee")
STATS_PRECISIONS = ("float32", "float64")
TEXT_ROWS = ("auto", "packed", "documents")
MAX_BATCHES = 1_000_000  # far beyond any calibration set; catches a typo such as --num-batches 10**12

_CALIBRATION, _PROJECTION, _SELECTION = "Calibration", "Projection", "Selection"


def option(default: Any, help: str, *flags: str, panel: str | None = None, **cli: Any) -> Any:
    """A dataclass field with its command-line declaration in the metadata (``cli=False``: library only)."""
    return field(default=default, metadata={"help": help, "flags": flags, "panel": panel, **cli})


def resolve_methods(method: str) -> list[str]:
    """``best``: the six candidates; ``auto``: those and whitened SVD; otherwise the one method."""
    if method == "best":
        return list(CANDIDATES)
    if method == "auto":  # the six and oblique: it scores as whitened SVD and still heals with W whole
        return list(AUTO_METHODS)
    if method not in METHODS:
        raise EspaceError(f"unknown candidate or method {method!r}", f"choose from {', '.join(METHODS)}, best, auto")
    return [method]


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise EspaceError(f"unknown {what} {value!r}", f"use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class DataOptions:
    """Calibration, validation and held-out batches: their source and their sizes."""

    calib_data: Path | None = option(
        None, "Calibration inputs: .npz of arrays keyed by model input name.", panel=_CALIBRATION
    )
    calib_text: str | None = option(
        None,
        "Calibration text: a file, a folder of .txt/.md/.rst/.html files (HTML pages read as their prose), or "
        "built-in English: builtin:pydoc (CPython's help pages, 0.5 MB), "
        "builtin:stdlib (its library's docstrings, 1.4 MB), builtin:python (both); needs --tokenizer.",
        panel=_CALIBRATION,
    )
    tokenizer: Path | None = option(None, "HuggingFace tokenizer directory for --calib-text.", panel=_CALIBRATION)
    text_rows: str = option(
        "packed", "How --calib-text becomes rows: packed (windows of --seq-len tokens cut from the whole text, "
        "for LMs) or documents (one row per paragraph, or per line in a text without blank lines; split at "
        "--seq-len, batches padded to their longest: the inputs an embedding or classification model serves); "
        "auto: packed for a causal LM (first output logits), documents otherwise.",
        panel=_CALIBRATION, choices=TEXT_ROWS,
    )  # fmt: skip
    batch_size: int = option(4, "Sequences per calibration batch.", panel=_CALIBRATION)
    seq_len: int = option(128, "Tokens per sequence (text and random sources).", panel=_CALIBRATION)
    num_batches: int = option(16, "Calibration batches to use (held-out ones included).", panel=_CALIBRATION)
    holdout: float = option(0.25, "Fraction of batches held out to measure output fidelity.", panel=_CALIBRATION)
    stats_precision: str = option(
        "float32", "Dtype of each batch's XᵀX (sums are float64).", panel=_CALIBRATION, choices=STATS_PRECISIONS
    )
    seed: int = option(0, "Seed for random calibration ids.", panel=_CALIBRATION)
    valid_text: str | None = option(
        None,
        "Validation text for --select fisher or validate (default: part of the calibration batches).",
        panel=_SELECTION,
    )
    valid_data: Path | None = option(None, "Validation .npz for --select fisher or validate.", panel=_SELECTION)
    valid_batches: int | None = option(
        None, "Validation batches read from --valid-text/--valid-data [default: --num-batches].", panel=_SELECTION
    )
    max_memory: str | None = option(
        None,
        "Memory budget (12G, 800M, 50%): the model is calibrated and compressed group by group, each on a slice "
        "of the graph, and never held whole; takes the fast settings (explicitly: --select none or proxy, --method "
        "mse or nmse) [default: off].",
        panel=_CALIBRATION,
    )
    validation: float = option(
        0.25, "Without --valid-*: the fraction of non-held-out batches used to validate.", cli=False
    )

    def __post_init__(self) -> None:
        check_calibration_sizes(
            batch_size=self.batch_size, seq_len=self.seq_len, num_batches=self.num_batches, seed=self.seed
        )
        if self.valid_batches is not None and self.valid_batches < 1:
            raise EspaceError("--valid-batches must be at least 1", "use a positive count")
        if self.num_batches > MAX_BATCHES:
            raise EspaceError(f"--num-batches {self.num_batches} is beyond any calibration set", "use at most 1000000")
        if not 0.0 <= self.holdout < 1.0:
            raise EspaceError(f"--holdout must be in [0, 1), got {self.holdout}", "try --holdout 0.25")
        if self.calib_data is not None and self.calib_text is not None:
            raise EspaceError("both --calib-data and --calib-text given", "choose one calibration source")
        for flag, text in (("--calib-text", self.calib_text), ("--valid-text", self.valid_text)):
            if text is not None and is_builtin_text(text) and str(text) not in BUILTIN_TEXTS:
                raise EspaceError(f"unknown built-in text {flag} {text}", f"use one of {', '.join(BUILTIN_TEXTS)}")
        _choice(self.stats_precision, STATS_PRECISIONS, "statistics precision")
        _choice(self.text_rows, TEXT_ROWS, "text rows")


@dataclass(frozen=True)
class RankOptions:
    """Which GEMMs are targeted and the rank L each one gets."""

    ratio: float = option(0.5, "Target compression of the targeted weights, in (0, 1).", "--ratio", "-r")
    rank_rule: str | int = option(
        "pow2", "pow2 (paper, tensor cores) or a granularity such as 16 or 64.", panel=_PROJECTION, type=str
    )
    min_rank: int = option(16, "Layers whose rank would fall below this stay dense.", panel=_PROJECTION)
    rank: int | None = option(None, "Force this rank L on every layer (L >= K: exact rewrite).", panel=_PROJECTION)
    siblings: str = option(
        "shared",
        "Layers reading one activation (Q/K/V, gate/up): one projection each, or one shared (fitted and ranked as "
        "their fused GEMM, like the paper's fused QKV).",
        panel=_PROJECTION,
        choices=SIBLING_MODES,
    )
    include_heads: bool = option(False, "Also compress LM head / pooler / embedding projections.", panel=_PROJECTION)
    exclude: tuple[str, ...] = option(
        (), "Regex of layer names to keep dense (repeatable).", panel=_PROJECTION, multiple=True
    )
    layer_ratio: float | None = option(
        None, "With selection: compression of each chosen layer [default: max(ratio, 0.5)].", panel=_SELECTION
    )
    fill: bool | None = option(
        None, "With selection: spend what the chosen layers save beyond --ratio on higher ranks (one --rank-rule "
        "step at a time, the most harmful layers first), so the plan lands as close to --ratio as the rule allows "
        "[default: on where a selection stops at --ratio in memory; off with --select none, --stop knee or "
        "--max-memory].", "--fill/--no-fill", panel=_SELECTION,
    )  # fmt: skip
    rebalance: bool = option(
        False, "With selection: --fill, and then move rank steps between the chosen layers while the selection's "
        "score says the model gains (a step up where the score falls most per weight, paid by steps down where "
        "it rises least); one extra trial per layer and rank considered.", panel=_SELECTION,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.rank is None:
            check_ratio(self.ratio)
        elif self.rank < 1:
            raise EspaceError(f"--rank must be at least 1, got {self.rank}", "use a positive rank")
        if self.layer_ratio is not None:
            check_ratio(self.layer_ratio)
        parse_rank_rule(self.rank_rule)
        check_siblings(self.siblings)
        if self.min_rank < 1:
            raise EspaceError(f"--min-rank must be at least 1, got {self.min_rank}", "use a positive rank")
        self.patterns  # noqa: B018 — compiles every --exclude now, so a bad one fails before any work

    @property
    def patterns(self) -> list[re.Pattern[str]]:
        return compile_patterns(self.exclude)

    def with_settings(self, **settings: Any) -> RankOptions:
        """These options with some fields given as keywords (``ratio=0.3, exclude=[...]``), validated again;
        an unknown name raises TypeError. For library calls that take a RankOptions or its fields."""
        if "exclude" in settings:
            settings["exclude"] = tuple(settings["exclude"] or ())
        return dataclasses.replace(self, **settings)

    def per_layer(self, select: str) -> float:
        """The compression each compressed layer gets: ``ratio`` itself, or with selection ``layer_ratio``
        (default max(ratio, 0.5), the paper's "at least 50 %"), the target then met by choosing layers."""
        if select == "none":
            return self.ratio
        return self.layer_ratio if self.layer_ratio is not None else max(self.ratio, 0.5)


@dataclass(frozen=True)
class SelectionOptions:
    """What factorizes each layer and how layers are chosen to meet the ratio.

    ``method`` and ``select`` left unset come from a preset (:data:`PRESETS`): ``recommended`` (``auto`` scored
    by ``validate``: the best result, minutes on a small model) or, with ``fast``, the cheap path (``mse``, no
    selection: seconds). What is given explicitly always wins; ``--select none`` alone takes ``--candidate``.
    :class:`CompressOptions` switches to the fast preset where the recommended one cannot run or means
    nothing (``fallback`` says why).
    """

    candidate: str | None = option(
        None, "Projection candidate (paper §3) of single-method runs [default: mse].", panel=_PROJECTION,
        choices=CANDIDATES,
    )  # fmt: skip
    method: str | None = option(
        None,
        "best: the six candidates, best per layer; svd/asvd/whitened-svd: baselines; oblique: whitened SVD as a "
        "static (A, M) pair that still heals; auto: six + oblique "
        "[default: auto; with --fast or --select none: --candidate].",
        panel=_SELECTION,
        choices=METHOD_CHOICES,
    )
    select_mode: str | None = option(
        None,
        "none: every layer at --ratio; fisher: each layer's method by its output error, layers ranked by a Fisher "
        "estimate of the validation loss from one forward + backward pass over the validation batches (needs torch), "
        "applied progressively to --ratio; validate: the exact mode, each layer x method scored on validation "
        "batches (hundreds of passes); proxy: ranked by the calibrated output error (no extra passes) "
        "[default: fisher (validate where gradients cannot be taken); with --fast: none].",
        "--select",
        panel=_SELECTION,
        choices=SELECT_MODES,
    )
    fast: bool = option(
        False,
        "The cheapest useful run: --method mse --select none (seconds instead of minutes, lower fidelity); an "
        "explicit --method/--select still wins.",
        "--fast",
        panel=_SELECTION,
    )
    max_layer_loss: float | None = option(
        None, "Skip layers whose alone loss increase exceeds this (relative; paper 0.02).", panel=_SELECTION
    )
    stop: str = option("ratio", "Stop at --ratio or at the curve's knee.", panel=_SELECTION, choices=STOP_RULES)
    valid_loss: str = option(
        "auto",
        "What --select validate scores: auto = distance to the original model (kl: KL of the next-token "
        "distribution for causal LMs; distill: 1 - cosine of the outputs otherwise); next-token: validation "
        "cross-entropy (the paper's perplexity).",
        panel=_SELECTION,
        choices=VALIDATION_LOSSES,
    )
    eig_solver: str = option(
        "auto",
        "Eigen-decompositions: lapack, or randomized subspace iteration (faster for L <= K/8 at K >= 2048); "
        "auto picks per matrix.",
        panel=_PROJECTION,
        choices=EIGEN_SOLVERS,
    )
    eig_device: str = option(
        "cpu",
        "Where the eigen-decompositions run: cpu (LAPACK), or a CUDA device (cuda, cuda:1): the same linear "
        "algebra in torch on the GPU (needs a CUDA build of torch).",
        panel=_PROJECTION,
    )
    eig_precision: str = option(
        "float64",
        "float32: the randomized iterations and LAPACK in single precision (≈ 2× faster; the vectors keep "
        ">= 0.99999 of the exact energy, measured); the final Rayleigh-Ritz step stays float64.",
        panel=_PROJECTION,
        choices=EIG_PRECISIONS,
    )
    progressive: bool = option(
        True,
        "With selection: apply layers in order of harm until the ratio (False: every layer, best method).",
        cli=False,
    )
    full_curve: bool = option(
        True, "Trace the progressive curve past the target (for --curve and --stop knee).", cli=False
    )
    fallback: str | None = option(None, "Why the fast preset replaced the recommended one.", cli=False)
    no_gradients: str | None = option(
        None, "Why the model's gradients cannot be taken (operators the torch interpreter lacks).", cli=False
    )
    no_fisher: str | None = option(
        None, "Why the preset's fisher selection cannot score this model (it then validates).", cli=False
    )

    def __post_init__(self) -> None:
        if self.candidate is not None:
            _choice(self.candidate, CANDIDATES, "candidate")
        resolve_methods(self.method_name)
        _choice(self.select, SELECT_MODES, "selection")
        _choice(self.stop, STOP_RULES, "stop rule")
        _choice(self.valid_loss, VALIDATION_LOSSES, "validation loss")
        _choice(self.eig_precision, EIG_PRECISIONS, "--eig-precision")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.eig_device):
            raise EspaceError(f"unknown --eig-device {self.eig_device!r}", "use cpu, cuda or cuda:N")

    @property
    def preset(self) -> str:
        """``fast`` (asked for, or a fallback) or ``recommended``: what fills the options left unset."""
        return "fast" if self.fast or self.fallback else "recommended"

    @property
    def explicit(self) -> bool:
        """Whether the method or the selection was chosen explicitly (then the preset fills only the rest)."""
        return self.method is not None or self.candidate is not None or self.select_mode is not None

    @property
    def select(self) -> str:
        """The selection asked for, or the preset's: ``fisher`` (one gradient pass over the validation
        batches), or ``validate`` where that pass cannot run (no torch, operators the gradient pass lacks,
        GEMMs fused into other operators: ``no_gradients``/``no_fisher`` say why)."""
        if self.select_mode is not None:
            return self.select_mode
        chosen = PRESETS[self.preset][1]
        if chosen == "fisher" and (self.no_gradients or self.no_fisher or not torch_installed()):
            return "validate"
        return chosen

    @property
    def method_name(self) -> str:
        if self.method is not None:
            return self.method
        if self.candidate is not None or self.select_mode == "none":
            return self.candidate or "mse"
        return PRESETS[self.preset][0]

    @property
    def methods(self) -> list[str]:
        """The methods to try; the preset's ``auto`` without the gradient candidates where torch is absent or
        the model's gradients cannot be taken (``no_gradients``: onnxruntime-genai's GroupQueryAttention, for
        one) — the recommended path still runs, and its report says why. An explicit method is never changed."""
        methods = resolve_methods(self.method_name)
        if self.method is None and self.method_name == "auto" and (self.no_gradients or not torch_installed()):
            return [m for m in methods if m not in GRADIENT_METHODS]
        return methods

    def summary(self) -> dict[str, Any]:
        """The settings a run used, for its report: the preset (``custom`` where something was chosen
        explicitly), the method and selection, and why the run differs from what was asked (``note``): the
        fast preset used without being asked for, or the preset's ``auto`` without torch."""
        settings = {"preset": "custom" if self.explicit else self.preset, "method": self.method_name,
                    "select": self.select}  # fmt: skip
        notes = [self.fallback] if self.fallback and not self.fast and self.from_preset else []
        dropped = [m for m in resolve_methods(self.method_name) if m not in self.methods]
        validates = self.select_mode is None and PRESETS[self.preset][1] == "fisher" and self.select == "validate"
        if dropped and self.no_gradients:
            notes.append(f"{self.no_gradients}, so auto leaves out {', '.join(dropped)}")
        elif dropped:
            notes.append(f"torch is not installed, so auto leaves out {', '.join(dropped)} (the torch extra adds them)")
        if validates and self.no_fisher:
            notes.append(f"{self.no_fisher}, so layers are scored by validate, not fisher")
        elif validates and dropped:  # the same reason: no gradients
            notes[-1] += " and layers are scored by validate, not fisher"
        elif validates:
            reason = self.no_gradients or "torch is not installed"
            notes.append(f"{reason}, so layers are scored by validate, not fisher")
        if notes:
            settings["note"] = "; ".join(notes)
        return settings

    @property
    def from_preset(self) -> bool:
        """Whether the preset decided the method or the selection (something was left unset)."""
        return self.select_mode is None or (
            self.method is None and self.candidate is None and self.select_mode != "none"
        )


def torch_installed() -> bool:
    """Whether torch can be found (not imported: that takes seconds), for the gradient candidates."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


#: ``(method, select)`` of each preset: what fills --method and --select when they are not given.
PRESETS = {"recommended": ("auto", "fisher"), "fast": ("mse", "none")}


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes, and how it shows progress."""

    output: Path | None = option(None, "Compressed model path [default: MODEL.espace.onnx].", "--output", "-o")
    report: Path | None = option(None, "JSON report path [default: OUTPUT.report.json; a .md twin is written too].")
    external_data: bool | None = option(
        None, "Store weights in OUTPUT.data [default: only past 2 GB].", "--external-data/--no-external-data"
    )
    statistics: Path | None = option(None, "Also write the calibration statistics (.npz).", panel=_SELECTION)
    plan: Path | None = option(None, "Also write the plan (.json + .npz).", panel=_SELECTION)
    curve: Path | None = option(None, "Write the loss-vs-compression curve here (.json and .png).", panel=_SELECTION)
    quantize: str = option(
        "none",
        "Quantize the compressed model with ONNX Runtime: int8 (dynamic, per-channel weights, CPU), int4 "
        "(weight-only MatMulNBits, block 32), qdq-int8 (static QDQ over the calibration batches, for TensorRT).",
        choices=("none", "int8", "int4", "qdq-int8"),
    )
    progress: bool = option(False, "Show progress bars.", cli=False)


_LEGACY_NAMES = {
    "report_path": "report",
    "plan_path": "plan",
    "curve_path": "curve",
    "validation_loss": "valid_loss",
    "select": "select_mode",
}


@dataclass(frozen=True)
class CompressOptions:
    """Every setting of a compression run, by concern."""

    data: DataOptions = field(default_factory=DataOptions)
    ranks: RankOptions = field(default_factory=RankOptions)
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    GROUPS = ("data", "ranks", "selection", "output")

    def __post_init__(self) -> None:
        reason = fast_fallback(self.data)
        if reason != self.selection.fallback:
            object.__setattr__(self, "selection", dataclasses.replace(self.selection, fallback=reason))

    @classmethod
    def from_settings(cls, base: CompressOptions | None = None, **settings: Any) -> CompressOptions:
        """Options from flat keyword settings (``ratio=0.3, calib_text=...``: the CLI's option names with
        underscores), each routed to its group; ``base`` supplies the rest. Unknown names raise TypeError."""
        base = base or cls()
        routed: dict[str, dict[str, Any]] = {group: {} for group in cls.GROUPS}
        for name, value in settings.items():
            name = _LEGACY_NAMES.get(name, name)
            group = _FIELD_GROUP.get(name)
            if group is None:
                raise TypeError(f"unknown compression option {name!r}")
            if name == "exclude":
                value = tuple(value or ())
            routed[group][name] = value
        return cls(**{group: dataclasses.replace(getattr(base, group), **routed[group]) for group in cls.GROUPS})


def fast_fallback(data: DataOptions) -> str | None:
    """Why the recommended preset (selection scored on validation batches, the whole model in memory) gives
    way to the fast one for this data, or None: under --max-memory, or on random calibration ids."""
    if data.max_memory is not None:
        return "--max-memory compresses group by group, which takes the fast settings"
    if data.calib_data is None and data.calib_text is None:
        return "random calibration ids, on which selection would score noise: give --calib-text or --calib-data"
    return None


def group_class(group: str) -> type:
    if group == "heal":  # the heal command's group lives with healing (imported on use: it needs no torch)
        from espace_export.heal_onnx import HealOptions

        return HealOptions
    return {"data": DataOptions, "ranks": RankOptions, "selection": SelectionOptions, "output": OutputOptions}[group]


_FIELD_GROUP = {f.name: group for group in CompressOptions.GROUPS for f in dataclasses.fields(group_class(group))}
