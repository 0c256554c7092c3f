"""Plans and calibration statistics as artifacts, and the planner that makes a plan.

``calibrate`` → statistics (``.npz``: activation and gradient sums, and the model's fingerprint)
``plan``      → per-layer decisions (``plan.json``, reviewable, + ``plan.npz`` with the chosen factors A, B)
``apply``     → the compressed model.

Each may run on another day or machine. A fingerprint of the targeted GEMMs (name, K, N and a SHA-1 of
each weight) travels in both artifacts; a plan or statistics file that does not match the model it is
applied to is rejected with an :class:`EspaceError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.baselines import BASELINES, METHODS, PROJECTIONS, Factorization, factorize, output_error
from espace_export.calibration import ActivationStats
from espace_export.candidates import NORMALIZED_CANDIDATES, candidate_matrix, eigen_decomposition
from espace_export.errors import EspaceError
from espace_export.gradients import GradientStats
from espace_export.model_io import atomic_output, read_arrays
from espace_export.selection import (
    best_method,
    inflection_point,
    layer_compression,
    progressive_selection,
    rank_layers,
    relative_increase,
)
from graph_passes.find import GemmTarget, weight_matrix

PLAN_FORMAT = "espace-plan/1"
STATS_FORMAT = "espace-stats/1"
GRADIENT_METHODS = ("nl-mse", "nl-mse-l2")
WEIGHT_FREE = ("mse", "nmse", "nl-mse", "nl-mse-l2")


def fingerprint(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> list[dict[str, Any]]:
    """What a plan must match: each target's name, K, N and a SHA-1 of its weight."""
    return [
        {
            "name": t.name,
            "K": t.K,
            "N": t.N,
            "sha1": hashlib.sha1(np.ascontiguousarray(weight_matrix(model, t)).tobytes()).hexdigest(),
        }
        for t in targets
    ]


def check_fingerprint(expected: Sequence[dict[str, Any]], model_print: Sequence[dict[str, Any]], what: str) -> None:
    by_name = {entry["name"]: entry for entry in model_print}
    for entry in expected:
        found = by_name.get(entry["name"])
        if found is None:
            raise EspaceError(
                f"the {what} names layer {entry['name']}, which this model does not have",
                f"use the model the {what} was made for, or make a new {what} for this one",
            )
        if (found["K"], found["N"]) != (entry["K"], entry["N"]):
            raise EspaceError(
                f"the {what} has layer {entry['name']} as {entry['K']}×{entry['N']}, this model has it "
                f"{found['K']}×{found['N']}",
                f"make a new {what} for this model",
            )
        if found["sha1"] != entry["sha1"]:
            raise EspaceError(
                f"the weights of {entry['name']} differ from those the {what} was made for",
                f"make a new {what} for this model (a plan is only valid for the exact weights it was calibrated on)",
            )


# ---- calibration statistics ---------------------------------------------------------------------------


@dataclass
class Calibration:
    """Activation (and optionally gradient) statistics of a model, with its fingerprint."""

    stats: dict[str, ActivationStats]
    gradients: dict[str, GradientStats] | None
    fingerprint: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def save_calibration(calibration: Calibration, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": STATS_FORMAT, "fingerprint": calibration.fingerprint, "info": calibration.info}
    meta["activations"] = []
    for i, (name, s) in enumerate(calibration.stats.items()):
        meta["activations"].append(
            {"name": name, "K": s.K, "normalized": s.normalized, "rows": s.rows, "rows_normalized": s.rows_normalized}
        )
        arrays[f"xx.{i}"] = s.sum_xx
        if s.normalized:
            arrays[f"xxn.{i}"] = s.sum_xx_normalized
        if calibration.gradients is not None and name in calibration.gradients:
            g = calibration.gradients[name]
            meta["activations"][-1].update({"sequences": g.sequences, "gradients_normalized": g.normalized})
            arrays[f"xg.{i}"] = g.sum_xg
            if g.normalized:
                arrays[f"xgn.{i}"] = g.sum_xg_normalized
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"statistics file not found: {path}", "run `espace-export calibrate` first")
    arrays = read_arrays(path, "statistics", "pass a file written by `espace-export calibrate`")
    try:
        meta = json.loads(arrays.pop("meta").tobytes())
    except Exception as exc:
        raise EspaceError(
            f"cannot read statistics {path}: {exc}", "pass a file written by `espace-export calibrate`"
        ) from None
    if meta.get("format") != STATS_FORMAT:
        raise EspaceError(f"{path} is not an espace-export statistics file", "run `espace-export calibrate`")
    stats: dict[str, ActivationStats] = {}
    gradients: dict[str, GradientStats] = {}
    for i, entry in enumerate(meta["activations"]):
        s = ActivationStats(entry["K"], entry["normalized"])
        s.sum_xx, s.rows, s.rows_normalized = arrays[f"xx.{i}"], entry["rows"], entry["rows_normalized"]
        if entry["normalized"]:
            s.sum_xx_normalized = arrays[f"xxn.{i}"]
        stats[entry["name"]] = s
        if f"xg.{i}" in arrays:
            g = GradientStats(entry["K"], entry["gradients_normalized"])
            g.sum_xg, g.sequences = arrays[f"xg.{i}"], entry["sequences"]
            if g.normalized:
                g.sum_xg_normalized = arrays[f"xgn.{i}"]
            gradients[entry["name"]] = g
    return Calibration(stats, gradients or None, meta["fingerprint"], meta.get("info", {}))


# ---- plans --------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    name: str
    K: int
    N: int
    L: int | None  # None: not compressible at the layer ratio
    method: str | None = None  # the chosen method (best score when selecting)
    selected: bool = False
    scores: dict[str, float] = field(default_factory=dict)  # method → validation loss (or proxy)
    harm: float | None = None  # relative loss increase of the chosen method applied alone
    order: int | None = None  # position in the progressive order
    group: str | None = None  # shared-P siblings: the name of the group's first layer (None: own P)


@dataclass
class Plan:
    ratio: float
    select: str  # "none" | "validate" | "proxy"
    methods: list[str]
    score_kind: str  # "validation loss (next-token)" | ... | "relative output error (proxy)"
    baseline_loss: float | None
    layers: list[LayerPlan]
    fingerprint: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    knee: int | None = None
    skipped: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, Factorization] = field(default_factory=dict)  # selected layers only

    def selected_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.selected]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("factors")
        return {"format": PLAN_FORMAT, **data}


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """``path`` (JSON) and ``path`` with suffix ``.npz``: the factors of the selected layers — A, and B only
    where it is not AᵀW (ASVD, whitened SVD), M instead of B for ``oblique``; ``apply`` folds AᵀW (M·W)
    from the fingerprinted weight itself."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(plan.as_json(), indent=2) + "\n")
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(plan.layers):
        if layer.name in plan.factors:
            factors = plan.factors[layer.name]
            arrays[f"A.{i}"] = factors.A
            if factors.M is not None:
                arrays[f"M.{i}"] = factors.M
            elif factors.B is not None and factors.method not in PROJECTIONS:
                arrays[f"B.{i}"] = factors.B
    with atomic_output(path.with_suffix(".npz")) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


_LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "K": (int,), "N": (int,), "L": (int, type(None)), "method": (str, type(None)),
    "selected": (bool,), "scores": (dict,), "harm": (float, int, type(None)), "order": (int, type(None)),
    "group": (str, type(None)),
}  # fmt: skip


_PLAN_TYPES: dict[str, tuple[type, ...]] = {
    "ratio": (float, int), "select": (str,), "methods": (list,), "score_kind": (str,),
    "baseline_loss": (float, int, type(None)), "curve": (list,), "knee": (int, type(None)), "skipped": (list,),
    "info": (dict,),
}  # fmt: skip


def _check_plan_fields(data: dict[str, Any]) -> None:
    """Types of the fields a plan is read by; raises ValueError naming the first that is off."""
    for key, allowed in _PLAN_TYPES.items():
        if key in data and (not isinstance(data[key], allowed) or isinstance(data[key], bool)):
            raise ValueError(f"{key!r} has the wrong type")
    if not all(isinstance(m, str) for m in data.get("methods", [])) or not all(
        isinstance(n, str) for n in data.get("skipped", [])
    ):
        raise ValueError("'methods' and 'skipped' must be lists of names")
    if not all(isinstance(p, dict) for p in data.get("curve", [])):
        raise ValueError("'curve' must be a list of points")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ValueError("'layers' is not a list")
    for entry in layers:
        if not isinstance(entry, dict):
            raise ValueError("a layer entry is not an object")
        for key, value in entry.items():
            allowed = _LAYER_TYPES.get(key)
            if allowed is None:
                raise ValueError(f"unknown layer field {key!r}")
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"layer field {key!r} has the wrong type")
    names = {entry.get("name") for entry in layers}
    for entry in layers:
        if entry.get("group") is not None and entry["group"] not in names:
            raise ValueError(
                f"layer {entry.get('name')!r} shares the P of {entry['group']!r}, which is not in the plan"
            )
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("K"), int)
        and isinstance(e.get("N"), int) and isinstance(e.get("sha1"), str)
        for e in fingerprint
    ):  # fmt: skip
        raise ValueError("'fingerprint' is not a list of {name, K, N, sha1}")


def check_plan_factors(plan: Plan, targets: Sequence[GemmTarget]) -> None:
    """Every factorised layer exists in the model, is fingerprinted, and has finite factors of its K×N."""
    by_name = {t.name: t for t in targets}
    printed = {entry["name"] for entry in plan.fingerprint}
    for name, factors in plan.factors.items():
        target = by_name.get(name)
        if target is None:
            raise EspaceError(f"the plan names layer {name}, which this model does not have",
                              "use the model the plan was made for, or make a new plan for this one")  # fmt: skip
        if name not in printed:
            raise EspaceError(f"the plan carries no fingerprint for layer {name}", "re-run `espace-export plan`")
        A, B, M = factors.A, factors.B, factors.M
        rank = A.shape[1] if A.ndim == 2 else 0
        if M is not None and (M.ndim != 2 or M.shape != (rank, target.K)):
            raise EspaceError(
                f"the plan's oblique factors for {name} are {A.shape} and {M.shape}, the layer is {target.K}×{target.N}",
                "re-run `espace-export plan` for this model",
            )
        b_shape = B.shape if B is not None else (rank, target.N)  # no B: folded from the weight at apply
        if A.ndim != 2 or len(b_shape) != 2 or A.shape[0] != target.K or b_shape != (rank, target.N) or rank < 1:
            shapes = f"{A.shape} and {b_shape}" if B is not None else f"{A.shape}"
            raise EspaceError(
                f"the plan's factors for {name} are {shapes}, the layer is {target.K}×{target.N}",
                "re-run `espace-export plan` for this model",
            )
        finite = [x for x in (A, B, M) if x is not None]
        if not all(np.issubdtype(x.dtype, np.floating) and np.isfinite(x).all() for x in finite):
            raise EspaceError(f"the plan's factors for {name} are not finite numbers", "re-run `espace-export plan`")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"plan not found: {path}", "run `espace-export plan` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EspaceError(
            f"plan {path} is not valid JSON: {exc}", "pass a plan written by `espace-export plan`"
        ) from None
    if not isinstance(data, dict) or data.pop("format", None) != PLAN_FORMAT:
        raise EspaceError(f"{path} is not an espace-export plan", "pass a plan written by `espace-export plan`")
    factors_path = path.with_suffix(".npz")
    if not factors_path.is_file():
        raise EspaceError(f"the plan's factors {factors_path} are missing", "keep plan.json and plan.npz together")
    arrays = read_arrays(factors_path, "the plan's factors", "re-run `espace-export plan`")
    try:
        _check_plan_fields(data)
        layers = [LayerPlan(**entry) for entry in data.pop("layers")]
        plan = Plan(layers=layers, **data)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise EspaceError(f"plan {path} is malformed ({exc})", "pass a plan written by `espace-export plan`") from None
    for i, layer in enumerate(layers):
        if f"A.{i}" in arrays and (f"B.{i}" in arrays or f"M.{i}" in arrays or layer.method in PROJECTIONS):
            A, B, M = arrays[f"A.{i}"], arrays.get(f"B.{i}"), arrays.get(f"M.{i}")
            plan.factors[layer.name] = Factorization(layer.method or "?", A, B, M)
    missing = [layer.name for layer in plan.selected_layers() if layer.name not in plan.factors]
    if missing:
        raise EspaceError(f"the plan's factors lack layer {missing[0]}", "re-run `espace-export plan`")
    return plan


# ---- the planner ---------------------------------------------------------------------------------------


def needs_normalized(methods: Sequence[str]) -> bool:
    return any(m in NORMALIZED_CANDIDATES for m in methods)


def needs_gradients(methods: Sequence[str]) -> bool:
    return any(m in GRADIENT_METHODS for m in methods)


def check_methods(methods: Sequence[str]) -> None:
    for method in methods:
        if method not in METHODS:
            raise EspaceError(f"unknown method {method!r}", f"choose from {', '.join(METHODS)}")


class Factorizer:
    """Every method's factorization of every layer, with weight-free eigenvectors shared per activation."""

    def __init__(
        self,
        model: onnx.ModelProto,
        calibration: Calibration,
        ranks: dict[str, int],
        targets: Sequence[GemmTarget],
    ) -> None:
        self.model = model
        self.calibration = calibration
        self.targets = {t.name: t for t in targets}
        self.ranks = ranks
        self._eigen: dict[tuple[str, str], np.ndarray] = {}
        self._weight: tuple[tuple[str, ...], list[np.ndarray]] | None = None  # the last unit's weights
        self._largest: dict[str, int] = {}
        for name, L in ranks.items():
            activation = self.targets[name].activation
            self._largest[activation] = max(self._largest.get(activation, 0), L)

    def __call__(self, name: str, method: str) -> Factorization:
        return self.unit([name], method)[name]

    def weights(self, names: Sequence[str]) -> list[np.ndarray]:
        """The float64 K×N weights of ``names``, read once for all the methods tried on one unit in a row
        (a weight kept in external data is read from disk)."""
        if self._weight is None or self._weight[0] != tuple(names):
            self._weight = (
                tuple(names),
                [weight_matrix(self.model, self.targets[n]).astype(np.float64) for n in names],
            )
        return self._weight[1]

    def unit(self, names: Sequence[str], method: str) -> dict[str, Factorization]:
        """Each layer of ``names`` factorised by ``method``; more than one name: siblings sharing one A.

        Siblings read the same activation, so a shared A is the factorisation of their fused weight
        ``[W₁ | W₂ | …]`` (K×ΣN, the paper's fused QKV GEMM) at the group's rank; each keeps its own
        columns of B.
        """
        targets = [self.targets[name] for name in names]
        activation = targets[0].activation
        if any(t.activation != activation for t in targets):
            raise ValueError(f"layers {list(names)} do not read one activation and cannot share a projection")
        L = self.ranks[names[0]]
        stats = self.calibration.stats[activation]
        grads = (self.calibration.gradients or {}).get(activation)
        if method in GRADIENT_METHODS and grads is None:
            raise EspaceError(f"{method} needs gradient statistics", "calibrate with gradients (--gradients)")
        weights = self.weights(names)
        W = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)
        statistics = {
            "C_X": stats.C_X,
            "C_X_normalized": stats.C_X_normalized if stats.normalized else None,
            "C_XG": grads.C_XG if grads is not None else None,
            "C_XG_normalized": grads.C_XG_normalized if grads is not None and grads.normalized else None,
        }
        eigenvectors = None
        if method in WEIGHT_FREE:
            key = (activation, method)
            if key not in self._eigen:
                C, by_magnitude = candidate_matrix(method, W=W, **statistics)  # type: ignore[arg-type]
                top = self._largest[activation]
                self._eigen[key] = eigen_decomposition(C, by_magnitude=by_magnitude, top=top)[1]
            eigenvectors = self._eigen[key]
        fused = factorize(method, W, L, eigenvectors=eigenvectors, **statistics)  # type: ignore[arg-type]
        if len(targets) == 1:
            return {names[0]: fused}
        split = np.cumsum([w.shape[1] for w in weights])[:-1]
        return {
            name: Factorization(method, fused.A, np.ascontiguousarray(B), fused.M)
            for name, B in zip(names, np.split(fused.B, split, axis=1), strict=True)
        }


def sibling_units(
    compressible: dict[str, int], targets: Sequence[GemmTarget], groups: Sequence[Sequence[str]] | None
) -> list[list[str]]:
    """The units a plan decides on: each compressible layer alone, or the given shared-P sibling groups
    (each a list of compressible layers reading one activation, at one rank) with the rest alone."""
    by_name = {t.name: t for t in targets}
    units: list[list[str]] = []
    grouped: set[str] = set()
    for group in groups or ():
        members = [name for name in group if name in compressible]
        if len(members) < 2:
            continue
        if len({by_name[n].activation for n in members}) != 1 or len({compressible[n] for n in members}) != 1:
            raise ValueError(f"sibling group {members} must read one activation at one rank")
        units.append(members)
        grouped.update(members)
    units += [[name] for name in compressible if name not in grouped]
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(units, key=lambda unit: order[unit[0]])


def make_plan(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    ranks: dict[str, int | None],
    calibration: Calibration,
    *,
    ratio: float,
    methods: Sequence[str],
    select: str = "validate",
    validator: Any = None,
    max_layer_loss: float | None = None,
    stop: str = "ratio",
    full_curve: bool = True,
    groups: Sequence[Sequence[str]] | None = None,
    progressive: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> Plan:
    """Decide, per targeted layer, whether and how it is compressed.

    ``select``:
    * ``none`` — every compressible layer with ``methods[0]`` (the classic fixed-candidate run);
    * ``validate`` — each layer × method applied alone and scored by ``validator`` (validation loss);
      layers ranked by their best method's loss increase and applied progressively until ``ratio`` of the
      targeted weights is saved (or to the curve's inflection point with ``stop="knee"``), skipping layers
      whose alone-increase exceeds ``max_layer_loss`` (relative; the paper uses 0.02);
    * ``proxy`` — the same with the relative output error ``E‖x(W − AB)‖²/E‖xW‖²`` as the score: no extra
      model passes, blind to how the rest of the network amplifies a layer's error.

    ``groups``: sibling layers (reading one activation, given one rank in ``ranks``) that share one
    projection; each group is scored, ranked and applied as one unit (see :meth:`Factorizer.unit`).

    ``progressive=False`` keeps the scoring but applies every compressible layer with its best method
    (the "best candidate per layer" plan at a uniform rank; ``ratio`` is then only recorded).

    ``on_step(phase, total)`` is called before each scored trial (for progress bars).
    """
    check_methods(methods)
    if select not in ("none", "validate", "proxy"):
        raise EspaceError(f"unknown selection {select!r}", "use none, validate or proxy")
    if select == "validate" and validator is None:
        raise EspaceError("--select validate needs validation data", "give calibration data with enough batches")
    by_name = {t.name: t for t in targets}
    compressible = {name: L for name, L in ranks.items() if L is not None}
    units = sibling_units(compressible, targets, groups)
    factorizer = Factorizer(model, calibration, compressible, targets)  # type: ignore[arg-type]
    layers = {t.name: LayerPlan(t.name, t.K, t.N, ranks.get(t.name)) for t in targets}
    for unit in units:
        if len(unit) > 1:
            for name in unit:
                layers[name].group = unit[0]
    baseline = validator.baseline if validator is not None else None
    score_kind = f"validation loss ({validator.loss})" if select == "validate" else "relative output error (proxy)"
    plan = Plan(ratio, select, list(methods), score_kind, baseline, list(layers.values()), fingerprint(model, targets))
    plan.info["siblings"] = "shared" if any(len(unit) > 1 for unit in units) else "separate"

    if select == "none":
        for unit in units:
            for name, factorization in factorizer.unit(unit, methods[0]).items():
                layers[name].method, layers[name].selected = methods[0], True
                plan.factors[name] = factorization
        plan.score_kind = "none"
        return plan

    candidates: dict[str, dict[str, dict[str, Factorization]]] = {}  # unit → method → layer → factors
    total_trials = len(units) * len(methods)
    for unit in units:
        key = unit[0]
        candidates[key] = {}
        scores: dict[str, float] = {}
        for method in methods:
            if on_step is not None:
                on_step("scoring", total_trials)
            factorizations = factorizer.unit(unit, method)
            candidates[key][method] = factorizations
            if select == "validate":
                override = {name: validator.effective(name, f.weight()) for name, f in factorizations.items()}
                scores[method] = float(validator.evaluate(override))
            else:
                scores[method] = _unit_output_error(
                    factorizer.weights(unit), unit, factorizations, calibration, by_name[unit[0]].activation
                )
        method = best_method(scores)
        harm = relative_increase(scores[method], baseline) if select == "validate" else scores[method]
        for name in unit:
            layers[name].scores, layers[name].method, layers[name].harm = dict(scores), method, harm

    unit_of = {unit[0]: unit for unit in units}
    if not progressive:
        for key in unit_of:
            for name, factorization in candidates[key][layers[key].method].items():  # type: ignore[index]
                layers[name].selected = True
                plan.factors[name] = factorization
        return plan
    harm = {key: float(layers[key].harm) for key in unit_of}  # type: ignore[arg-type]
    order, skipped = rank_layers(harm, max_layer_loss if select == "validate" else None)
    plan.skipped = [name for key in skipped for name in unit_of[key]]
    for position, key in enumerate(order):
        for name in unit_of[key]:
            layers[name].order = position
    saved = {key: unit_saving([by_name[n] for n in unit_of[key]], compressible[key]) for key in order}
    targeted = sum(t.K * t.N for t in targets)

    def chosen(key: str) -> dict[str, Factorization]:
        return candidates[key][layers[key].method]  # type: ignore[index]

    def evaluate(applied: list[str]) -> float:
        if on_step is not None:
            on_step("progressive", len(order))
        override = {n: validator.effective(n, f.weight()) for key in applied for n, f in chosen(key).items()}
        return float(validator.evaluate(override))

    selected, plan.curve = progressive_selection(
        order,
        saved,
        targeted,
        ratio,
        evaluate=evaluate if select == "validate" else None,
        estimate=harm,
        baseline=baseline if baseline is not None else 0.0,
        full_curve=full_curve or stop == "knee",
    )
    plan.knee = inflection_point(plan.curve)
    if stop == "knee":
        selected = [p["layer"] for p in plan.curve[1 : plan.knee + 1]]
    for key in selected:
        for name, factorization in chosen(key).items():
            layers[name].selected = True
            plan.factors[name] = factorization
    return plan


def unit_saving(members: Sequence[Any], L: int) -> int:
    """Weights saved by compressing ``members`` (anything with K and N: targets, layer plans) at rank L:
    one K×L projection for the group, L×N each."""
    K = members[0].K
    N = sum(t.N for t in members)
    return K * N - L * (K + N)


def _unit_output_error(
    weights: Sequence[np.ndarray],
    names: Sequence[str],
    factorizations: dict[str, Factorization],
    calibration: Calibration,
    activation: str,
) -> float:
    """Relative output error of a unit: of its fused weight, so siblings count by their output energy."""
    W = np.concatenate(weights, axis=1)
    B = np.concatenate([factorizations[n].B for n in names], axis=1)  # type: ignore[misc]
    return output_error(W, Factorization("fused", factorizations[names[0]].A, B), calibration.stats[activation].C_X)


def plan_summary(plan: Plan, targets: Sequence[GemmTarget]) -> dict[str, Any]:
    """Targeted compression the plan achieves (a shared P counted once per group) and method counts."""
    before = sum(t.K * t.N for t in targets)
    units: dict[str, list[LayerPlan]] = {}
    methods: dict[str, int] = {}
    for layer in plan.selected_layers():
        assert layer.L is not None and layer.method is not None
        units.setdefault(layer.group or layer.name, []).append(layer)
        methods[layer.method] = methods.get(layer.method, 0) + 1
    saved = sum(unit_saving(members, members[0].L) for members in units.values())  # type: ignore[arg-type]
    return {
        "targeted_compression_planned": saved / before,
        "layers_selected": len(plan.selected_layers()),
        "shared_groups": sum(len(members) > 1 for members in units.values()),
        "methods": methods,
        "layer_compression": {
            layer.name: layer_compression(layer.K, layer.N, layer.L) for layer in plan.selected_layers() if layer.L
        },
    }


__all__ = [
    "BASELINES",
    "Calibration",
    "LayerPlan",
    "Plan",
    "check_fingerprint",
    "fingerprint",
    "load_calibration",
    "load_plan",
    "make_plan",
    "save_calibration",
    "save_plan",
]
