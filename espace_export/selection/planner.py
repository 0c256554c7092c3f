"""The planner: every method's factorization of every unit, scored, ranked and applied progressively (paper §4.2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from espace_export.calibration import distributed
from espace_export.errors import EspaceError
from espace_export.io.artifacts import Calibration, LayerPlan, Plan, fingerprint
from espace_export.selection.candidates import NORMALIZED_CANDIDATES, candidate_matrix, eigen_decomposition
from espace_export.selection.factorizations import (
    METHODS,
    Factorization,
    factorize,
    output_error,
)
from espace_export.selection.ranks import (
    best_method,
    inflection_point,
    layer_compression,
    parse_rank_rule,
    progressive_selection,
    rank_layers,
    relative_increase,
)
from graph_passes.find import GemmTarget, weight_matrix

GRADIENT_METHODS = ("nl-mse", "nl-mse-l2")


WEIGHT_FREE = ("mse", "nmse", "nl-mse", "nl-mse-l2")


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

    def at_rank(self, names: Sequence[str], method: str, L: int) -> dict[str, Factorization]:
        """:meth:`unit` at rank ``L`` instead of the unit's own. A rank above those the activation's
        eigenvectors were computed for recomputes them with headroom (2·L of them, at most K), so a unit raised
        step by step (``--fill``, ``--rebalance``) pays a new eigen-decomposition each time its rank doubles,
        not at every step."""
        for name in names:
            self.ranks[name] = L
        activation = self.targets[names[0]].activation
        if self._largest[activation] < L:
            self._largest[activation] = min(2 * L, self.targets[names[0]].K)
            self._eigen = {key: value for key, value in self._eigen.items() if key[0] != activation}
        return self.unit(names, method)

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
            for name, B in zip(names, np.split(fused.B, split, axis=1), strict=True)  # type: ignore[arg-type]
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


@dataclass(frozen=True)
class PlanSettings:
    """How a plan decides (the selection options of a run, and its target ratio).

    ``select``:
    * ``none`` — every compressible layer with ``methods[0]`` (the classic fixed-candidate run);
    * ``validate`` — each unit × method applied alone and scored by a validator (validation loss); units
      ranked by their best method's loss increase and applied progressively until ``ratio`` of the targeted
      weights is saved (or to the curve's inflection point with ``stop="knee"``), skipping units whose
      alone-increase exceeds ``max_layer_loss`` (relative; the paper uses 0.02);
    * ``fisher`` — units ranked by the Fisher estimate of the validation loss their best method causes
      (:func:`espace_export.harm.fisher_harm`, from one gradient pass over the validation batches), each
      unit's method chosen by its own output error (:func:`_local_errors`): no validation pass;
    * ``proxy`` — the same with the relative output error ``E‖x(W − AB)‖²/E‖xW‖²`` as the score: no extra
      model passes, blind to how the rest of the network amplifies a layer's error.

    ``progressive=False`` keeps the scoring but applies every compressible unit with its best method (the
    "best candidate per layer" plan at a uniform rank; ``ratio`` is then only recorded). ``full_curve`` traces
    the progressive curve past the target (for ``--curve`` and ``stop="knee"``).
    """

    ratio: float
    methods: tuple[str, ...]
    select: str = "validate"
    max_layer_loss: float | None = None
    stop: str = "ratio"
    full_curve: bool = True
    progressive: bool = True
    fill: str | int | None = None  # a rank rule: spend the saving beyond ``ratio`` on higher ranks (:func:`fill_ranks`)
    rebalance: bool = (
        False  # with ``fill``: also move rank steps between units where the score says so (:func:`rebalance_ranks`)
    )
    min_rank: int = 1  # the lowest rank :func:`rebalance_ranks` may lower a unit to


@dataclass
class PlanInputs:
    """What a plan is made from: the model, its targets, each target's rank (None: not compressible), the
    statistics, and the sibling groups sharing one projection (each scored, ranked and applied as one unit)."""

    model: onnx.ModelProto
    targets: Sequence[GemmTarget]
    ranks: dict[str, int | None]
    calibration: Calibration
    groups: Sequence[Sequence[str]] | None = None


def make_plan(
    inputs: PlanInputs,
    settings: PlanSettings,
    *,
    validator: Any = None,
    on_step: Callable[[str, int], None] | None = None,
    fisher: Any = None,
) -> Plan:
    """Decide, per targeted layer, whether and how it is compressed (see :class:`PlanSettings`).

    ``validator`` scores trials for ``select="validate"``; ``on_step(phase, total)`` is called before each
    scored trial (for progress bars). ``fisher``: samples from :func:`espace_export.harm.collect_fisher_samples`
    on the validation batches, for ``select="fisher"``.
    """
    check_methods(settings.methods)
    if settings.select not in ("none", "validate", "proxy", "fisher"):
        raise EspaceError(f"unknown selection {settings.select!r}", "use none, validate, proxy or fisher")
    if settings.select == "fisher" and fisher is None:
        raise EspaceError("--select fisher needs activation gradients", "collect them with harm.collect_fisher_samples")
    if settings.select == "validate" and validator is None:
        raise EspaceError("--select validate needs validation data", "give calibration data with enough batches")
    compressible = {name: L for name, L in inputs.ranks.items() if L is not None}
    units = sibling_units(compressible, inputs.targets, inputs.groups)
    factorizer = Factorizer(inputs.model, inputs.calibration, compressible, inputs.targets)
    plan = _empty_plan(inputs, settings, units, validator)
    if settings.select == "fisher":
        plan.score_kind = f"Fisher estimate of the loss change ({fisher.loss} gradients)"
    if settings.select == "none":
        method = settings.methods[0]
        shared = share_trials(units, [method], factorizer, lambda unit, m: (factorizer.unit(unit, m), 0.0))
        for unit in units:
            _choose(plan, shared[unit[0], method][0], method)
        plan.score_kind = "none"
        return plan
    scorer = fisher if settings.select == "fisher" else validator
    candidates = _score_units(plan, units, factorizer, settings, scorer, on_step)
    if not distributed.is_main_rank():  # every rank has every trial; rank 0 alone applies them progressively and writes
        return plan
    if not settings.progressive:
        for unit in units:
            _choose(plan, candidates[unit[0]][plan.layer(unit[0]).method])  # type: ignore[index]
        return plan
    _apply_progressively(plan, units, candidates, inputs, settings, validator, on_step, factorizer, scorer)
    return plan


def _empty_plan(inputs: PlanInputs, settings: PlanSettings, units: list[list[str]], validator: Any) -> Plan:
    """The plan with every target undecided; sibling groups marked."""
    layers = {t.name: LayerPlan(t.name, t.K, t.N, inputs.ranks.get(t.name)) for t in inputs.targets}
    for unit in units:
        if len(unit) > 1:
            for name in unit:
                layers[name].group = unit[0]
    baseline = validator.baseline if validator is not None else None
    kind = f"validation loss ({validator.loss})" if settings.select == "validate" else "relative output error (proxy)"
    plan = Plan(settings.ratio, settings.select, list(settings.methods), kind, baseline, list(layers.values()),
                fingerprint(inputs.model, inputs.targets))  # fmt: skip
    plan.info["siblings"] = "shared" if any(len(unit) > 1 for unit in units) else "separate"
    return plan


def _choose(plan: Plan, factorizations: dict[str, Factorization], method: str | None = None) -> None:
    """Select each layer of a unit with its factorization (and, given, the method that made it)."""
    for name, factorization in factorizations.items():
        layer = plan.layer(name)
        layer.selected = True
        if method is not None:
            layer.method = method
        plan.factors[name] = factorization


def _score_units(
    plan: Plan,
    units: list[list[str]],
    factorizer: Factorizer,
    settings: PlanSettings,
    validator: Any,
    on_step: Callable[[str, int], None] | None,
) -> dict[str, dict[str, dict[str, Factorization]]]:
    """Every unit × method applied alone and scored; each unit's best method and harm recorded in the plan.
    Returns unit → method → layer → factors. Under torchrun the trials are shared by the ranks
    (:func:`share_trials`) and every rank ends with all of them."""
    total_trials = len(units) * len(settings.methods)

    def trial(unit: list[str], method: str) -> tuple[dict[str, Factorization], float]:
        if on_step is not None:
            on_step("scoring", total_trials)
        factorizations = factorizer.unit(unit, method)
        return factorizations, _score(unit, factorizations, factorizer, settings.select, validator)

    results = share_trials(units, settings.methods, factorizer, trial)
    candidates: dict[str, dict[str, dict[str, Factorization]]] = {}
    for unit in units:
        candidates[unit[0]] = {method: results[unit[0], method][0] for method in settings.methods}
        scores = {method: results[unit[0], method][1] for method in settings.methods}
        method = best_method(scores)
        if settings.select == "fisher" and len(settings.methods) > 1:
            method = best_method(_local_errors(unit, candidates[unit[0]], factorizer))
        for name in unit:
            layer = plan.layer(name)
            layer.scores, layer.method = dict(scores), method
        _set_harm(plan, unit, scores[method], settings.select)
    return candidates


def _local_errors(
    unit: list[str], by_method: dict[str, dict[str, Factorization]], factorizer: Factorizer
) -> dict[str, float]:
    """Each method's calibrated relative output error on one unit: what ``--select fisher`` chooses a unit's
    method by. Between factorisations of one layer the layer's own output error decides (it chose the same
    method as ``validate`` on 100 % of MiniLM's units and 96 % of the tiny LM's, the Fisher estimate 83–92 %:
    a single-probe estimate is noisier than the differences between methods); across layers the Fisher
    estimate ranks (Spearman 0.93–0.97 with the validated harm, the output error −0.34–0.62)."""
    activation = factorizer.targets[unit[0]].activation
    weights = factorizer.weights(unit)
    return {
        method: _unit_output_error(weights, unit, factorizations, factorizer.calibration, activation)
        for method, factorizations in by_method.items()
    }


def _score(
    unit: list[str], factorizations: dict[str, Factorization], factorizer: Factorizer, select: str, scorer: Any
) -> float:
    """One trial's harm: the validation loss with the unit applied alone, the Fisher estimate, or the
    calibrated relative output error (proxy)."""
    if select == "validate":
        return float(scorer.evaluate({name: scorer.effective(name, f.weight()) for name, f in factorizations.items()}))
    if select == "fisher":
        from espace_export.harm import fisher_harm

        return float(fisher_harm(scorer, dict(zip(unit, factorizer.weights(unit), strict=True)), factorizations))
    activation = factorizer.targets[unit[0]].activation
    return _unit_output_error(factorizer.weights(unit), unit, factorizations, factorizer.calibration, activation)


Trial = Callable[[list[str], str], tuple[dict[str, Factorization], float]]


def share_trials(
    units: list[list[str]], methods: Sequence[str], factorizer: Factorizer, trial: Trial
) -> dict[tuple[str, str], tuple[dict[str, Factorization], float]]:
    """``trial(unit, method)`` for every unit × method, keyed by (the unit's first layer, method).

    The units reading one activation go together (they share its eigenvectors, and a unit's weights are read
    once for all its methods); under torchrun these bundles are spread over the ranks by their cost (K³ per
    unit: the eigen-decompositions dominate) and the results gathered on every rank
    (:func:`espace_export.calibration.distributed.share_work`). One process runs them in order.
    """
    bundles: dict[str, list[list[str]]] = {}
    for unit in units:
        bundles.setdefault(factorizer.targets[unit[0]].activation, []).append(unit)

    def work(bundle: list[list[str]]) -> dict[tuple[str, str], tuple[dict[str, Factorization], float]]:
        return {(unit[0], method): trial(unit, method) for unit in bundle for method in methods}

    def cost(bundle: list[list[str]]) -> float:
        return float(factorizer.targets[bundle[0][0]].K) ** 3 * len(bundle) * len(methods)

    results: dict[tuple[str, str], tuple[dict[str, Factorization], float]] = {}
    for part in distributed.share_work(list(bundles.values()), work, cost=cost):
        results.update(part)
    return results


def _apply_progressively(
    plan: Plan,
    units: list[list[str]],
    candidates: dict[str, dict[str, dict[str, Factorization]]],
    inputs: PlanInputs,
    settings: PlanSettings,
    validator: Any,
    on_step: Callable[[str, int], None] | None,
    factorizer: Factorizer,
    scorer: Any = None,
) -> None:
    """Units from least to most harmful until the ratio (or the curve's knee); the curve kept in the plan.
    With ``settings.fill`` (at the ratio only) the saving beyond it then raises the ranks of the most
    harmful chosen units (:func:`fill_ranks`), each refactorized at its new rank."""
    by_name = {t.name: t for t in inputs.targets}
    unit_of = {unit[0]: unit for unit in units}
    harm = {key: float(plan.layer(key).harm) for key in unit_of}  # type: ignore[arg-type]
    order, skipped = rank_layers(harm, settings.max_layer_loss if settings.select == "validate" else None)
    plan.skipped = [name for key in skipped for name in unit_of[key]]
    for position, key in enumerate(order):
        for name in unit_of[key]:
            plan.layer(name).order = position
    rank = {name: L for name, L in inputs.ranks.items() if L is not None}
    saved = {key: unit_saving([by_name[n] for n in unit_of[key]], rank[key]) for key in order}
    targeted = sum(t.K * t.N for t in inputs.targets)

    def chosen(key: str) -> dict[str, Factorization]:
        return candidates[key][plan.layer(key).method]  # type: ignore[index]

    def evaluate(applied: list[str]) -> float:
        if on_step is not None:
            on_step("progressive", len(order))
        override = {n: validator.effective(n, f.weight()) for key in applied for n, f in chosen(key).items()}
        return float(validator.evaluate(override))

    selected, plan.curve = progressive_selection(
        order,
        saved,
        targeted,
        settings.ratio,
        evaluate=evaluate if settings.select == "validate" else None,
        estimate=harm,
        baseline=plan.baseline_loss if plan.baseline_loss is not None else 0.0,
        full_curve=settings.full_curve or settings.stop == "knee",
    )
    plan.knee = inflection_point(plan.curve)
    if settings.stop == "knee":
        selected = [p["layer"] for p in plan.curve[1 : plan.knee + 1]]
    elif settings.fill is not None:
        members = {key: [by_name[n] for n in unit_of[key]] for key in selected}
        before = {key: rank[key] for key in selected}
        if settings.rebalance:
            current = {key: chosen(key) for key in selected}
            refits = rebalance_ranks(plan, members, before, current, unit_of, factorizer, settings, scorer, targeted)
            moved = {key: L for key, (L, _) in refits.items()}
            for key, (_, factorizations) in refits.items():
                candidates[key][str(plan.layer(key).method)] = factorizations
            plan.info["rebalanced"] = {key: [before[key], L] for key, L in moved.items()}
        else:
            moved = fill_ranks(members, before, harm, targeted, settings.ratio, settings.fill)
            for key, L in moved.items():
                method = str(plan.layer(key).method)
                candidates[key][method] = factorizer.at_rank(unit_of[key], method, L)
                score = _score(unit_of[key], candidates[key][method], factorizer, settings.select, scorer)
                _set_harm(plan, unit_of[key], score, settings.select)
            plan.info["filled"] = {key: [before[key], L] for key, L in moved.items()}
        for key, L in moved.items():
            for name in unit_of[key]:
                plan.layer(name).L = L
    for key in selected:
        _choose(plan, chosen(key))


def fill_ranks(
    units: Mapping[str, Sequence[Any]],
    ranks: dict[str, int],
    harm: dict[str, float],
    targeted_params: int,
    ratio: float,
    rule: str | int,
) -> dict[str, int]:
    """Higher ranks for chosen units, paid for by what they save beyond ``ratio`` of ``targeted_params``:
    in passes from the most harmful unit to the least, each unit whose next rank under ``rule`` (one
    granularity step; the next power of two for ``pow2``) still fits the surplus takes it, until none fits.
    ``units``: unit → its members (K, N; siblings share one K×L projection). Returns unit → its new rank, for
    the units raised; the plan still saves at least ``ratio``. Progressive selection stops at the first unit
    that reaches the ratio, so it overshoots by up to that unit's whole saving (0.014 of MiniLM's targeted
    weights at 0.5): this gives it back where the error is largest."""
    granularity = parse_rank_rule(rule)
    surplus = surplus_saving(units, ranks, ratio, targeted_params)
    now = dict(ranks)
    order = sorted(units, key=lambda key: -harm.get(key, 0.0))
    raised = True
    while raised:
        raised = False
        for key in order:
            members, L = units[key], now[key]
            higher = rank_step(L, granularity, up=True)
            cost = unit_saving(members, L) - unit_saving(members, higher)
            if unit_saving(members, higher) > 0 and cost <= surplus + 1e-9:
                now[key], surplus, raised = higher, surplus - cost, True
    return {key: L for key, L in now.items() if ranks[key] != L}


def rebalance_ranks(
    plan: Plan,
    units: Mapping[str, Sequence[Any]],
    ranks: dict[str, int],
    current: Mapping[str, dict[str, Factorization]],
    unit_of: Mapping[str, list[str]],
    factorizer: Factorizer,
    settings: PlanSettings,
    scorer: Any,
    targeted_params: int,
) -> dict[str, tuple[int, dict[str, Factorization]]]:
    """Ranks moved between the chosen units, one rank-rule step at a time, where the selection's own score
    says the model gains: the step up that lowers a unit's score most per weight it costs is paid for by the
    excess over ``settings.ratio`` or, when that is short, by the steps down that raise other units' scores
    least per weight they free — taken only while the fall exceeds the rises (the scores of one unit alone,
    summed over units: Fisher, proxy or validation). Each unit is refactorized and rescored at each rank it is
    considered for (one trial each); ``current``: each unit's factorizations at its rank in ``ranks``. The
    moved units' layers get their ``harm`` rescored. Returns unit → (new rank, its factorizations), for the
    units moved."""
    granularity = parse_rank_rule(settings.fill)  # type: ignore[arg-type]
    method = {key: str(plan.layer(key).method) for key in units}
    trials: dict[tuple[str, int], tuple[dict[str, Factorization], float]] = {}

    def trial(key: str, L: int) -> tuple[dict[str, Factorization], float]:
        if (key, L) not in trials:
            factorizations = factorizer.at_rank(unit_of[key], method[key], L)
            trials[key, L] = (factorizations, _score(unit_of[key], factorizations, factorizer, settings.select, scorer))
        return trials[key, L]

    now = dict(ranks)
    for key in units:  # the rank each unit was chosen at: its score is already known
        trials[key, now[key]] = (current[key], plan.layer(key).scores[method[key]])
    surplus = surplus_saving(units, now, settings.ratio, targeted_params)
    for _ in range(8 * len(units)):  # each move lowers the summed score: a bound, not a stop rule
        ups = []
        for key, members in units.items():
            higher = rank_step(now[key], granularity, up=True)
            if unit_saving(members, higher) > 0:
                gain = trial(key, now[key])[1] - trial(key, higher)[1]
                cost = unit_saving(members, now[key]) - unit_saving(members, higher)
                ups.append((gain / cost, gain, cost, key, higher))
        ups = [u for u in ups if u[1] > 0]
        if not ups:
            break
        _, gain, cost, key, higher = max(ups)
        if cost > surplus + 1e-9:
            downs = []
            for other, members in units.items():
                lower = rank_step(now[other], granularity, up=False)
                if other != key and lower >= max(settings.min_rank, 1):
                    loss = trial(other, lower)[1] - trial(other, now[other])[1]
                    freed = unit_saving(members, lower) - unit_saving(members, now[other])
                    downs.append((loss / freed, loss, freed, other, lower))
            paid, loss_sum, freed_sum = [], 0.0, 0.0
            for _, loss, freed, other, lower in sorted(downs):
                if cost <= surplus + freed_sum + 1e-9:
                    break
                paid.append((other, lower))
                loss_sum, freed_sum = loss_sum + loss, freed_sum + freed
            if cost > surplus + freed_sum + 1e-9 or loss_sum >= gain:
                break
            for other, lower in paid:
                now[other] = lower
            surplus += freed_sum
        now[key], surplus = higher, surplus - cost
    moved = {}
    for key, L in now.items():
        if ranks[key] != L:
            factorizations, score = trial(key, L)
            moved[key] = (L, factorizations)
            _set_harm(plan, unit_of[key], score, settings.select)
    return moved


def rank_step(L: int, granularity: int | None, up: bool) -> int:
    """The rank one step above (or below) ``L`` under a rank rule's granularity (``None``: ``pow2``, whose
    steps double and halve)."""
    if granularity is None:
        return 2 * L if up else L // 2
    return L + granularity if up else L - granularity


def surplus_saving(
    units: Mapping[str, Sequence[Any]], ranks: Mapping[str, int], ratio: float, targeted_params: int
) -> float:
    """Weights ``units`` save at ``ranks`` beyond ``ratio`` of ``targeted_params``: what higher ranks may spend."""
    return sum(unit_saving(members, ranks[key]) for key, members in units.items()) - ratio * targeted_params


def _set_harm(plan: Plan, names: Sequence[str], score: float, select: str) -> None:
    """A unit's ``harm`` from its score at the rank it now has (validation: relative to the baseline loss)."""
    harm = relative_increase(score, float(plan.baseline_loss or 0.0)) if select == "validate" else score
    for name in names:
        plan.layer(name).harm = harm


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


def plan_summary(plan: Plan, targets: Sequence[Any]) -> dict[str, Any]:
    """Targeted compression the plan achieves (a shared P counted once per group) and method counts.

    ``targets``: every targeted layer, anything with K and N (targets, or the plan's own layers)."""
    before = sum(t.K * t.N for t in targets)
    units: dict[str, list[LayerPlan]] = {}
    methods: dict[str, int] = {}
    for layer in plan.selected_layers():
        assert layer.L is not None and layer.method is not None
        units.setdefault(layer.group or layer.name, []).append(layer)
        methods[layer.method] = methods.get(layer.method, 0) + 1
    saved = sum((unit_saving(members, int(members[0].L or 0)) for members in units.values()), 0)
    return {
        "targeted_compression_planned": saved / before,
        "layers_selected": len(plan.selected_layers()),
        "shared_groups": sum(len(members) > 1 for members in units.values()),
        "methods": methods,
        "layer_compression": {
            layer.name: layer_compression(layer.K, layer.N, layer.L) for layer in plan.selected_layers() if layer.L
        },
    }
