"""A cheap score that predicts a layer's validated harm: the Fisher (second-order Taylor) estimate.

``--select validate`` measures each layer × method alone on validation batches (1 + units × methods +
units passes); ``--select proxy`` scores the calibrated output error E‖x(W − AB)‖²/E‖xW‖², blind to how
the rest of the network amplifies a layer's error. This module scores the *loss* change instead, from one
forward + backward pass over the calibration batches (≈ 3 forward passes), with no pass per trial.

Derivation. Take one GEMM j, ``Y = X·W_j`` (X: M×K, a row per token of one sequence s), replaced by the
factorisation ``A·B``: every output row moves by ``x_t D_j`` with ``D_j = A·B − W_j`` (K×N). To first
order the sequence's loss ℓ_s moves by

    Δℓ_s ≈ Σ_t ⟨x_t D_j, g_t⟩ = ⟨X_sᵀ G_{j,s}, D_j⟩,        G_{j,s} = ∂ℓ_s/∂Y_{j,s} (M×N),

i.e. the inner product of D_j with the sequence's weight gradient; a unit of siblings sums it over its
GEMMs. The validated harm is a divergence from the original model — KL of the next-token distribution
(causal LMs) or 1 − cos of the output rows (encoders) — whose gradient vanishes at the original, so its
Taylor expansion starts at second order with the Fisher / Gauss–Newton matrix F of the perturbation δ:
``harm ≈ ½ δᵀFδ``. F is the expected outer product of per-sequence loss gradients, so

    harm ≈ ½ E_s[(∇ℓ_sᵀ δ)²] = ½ E_s[Δℓ_s²]            (per token: divided by the mean tokens per sequence)

which is what :func:`fisher_harm` returns, with the expectation over the sampled sequences:
``½ Σ_s Δℓ_s² / Σ_s M_s`` (per sequence, ``/ S``, for a pooled output of one row per sequence). The
sequences must be *held out* — the validation batches, not the calibration ones: on the tokens a
factorisation was fitted to, its error is the in-sample one (on MiniLM the last block's attention output
projection loses 2·10⁻⁴ in-sample and 0.1 on other text, and the calibration-batch score ranked it among
the harmless). For causal LMs ℓ_s is the cross-entropy against labels drawn from the model's
own next-token distribution (one per position): then E[∇ℓ ∇ℓᵀ] is the true Fisher, the Hessian of the
KL validation loss, and the cross terms between positions vanish in expectation, so the estimate is KL
per token to second order (``loss="next-token"`` uses the data's labels instead: the *empirical*
Fisher, which weighs a poorly fitted token by how wrong the model is there). For encoders ℓ_s = ⟨r_s, y_s⟩
with a Gaussian probe r_s per output row, r = (I − ŷ₀ŷ₀ᵀ)z/‖y₀‖ (:func:`cosine_probe_loss`), for which
E_r[Δℓ_s²] = Σ_rows ‖(Jδ)⊥‖²/‖y₀‖², the Gauss–Newton form of 2 Σ_rows (1 − cos) — the validation loss —
estimated here with one probe per sequence. (An isotropic probe, ``loss="probe"``, gives ‖Jδ‖², the
Gauss–Newton of ½‖y − y₀‖²: it weighs rows by ‖y₀‖² and counts changes along them, which 1 − cos does not;
on MiniLM it put the unit that validates as most harmful among the least.) Both are first-order in D: a layer whose error the network cancels or amplifies
nonlinearly is ranked by its linearised effect only.

Relation to NL-MSE (paper Proposition 3): for an ESPACE projection D_j = −(I − PPᵀ)W_j, and
Σ_j ⟨X_sᵀG_{j,s}, D_j⟩ = −tr((I − PPᵀ) X_sᵀ Γ_s) with Γ_s = Σ_j G_{j,s} W_jᵀ = ∂ℓ_s/∂X_s through the unit's
GEMMs; NL-MSE's E[XᵀX ΓᵀΓ]/M² bounds E_s[Δℓ_s²] from second moments alone (with a per-sequence
independence approximation), which is enough to choose P but cannot score an arbitrary D (the SVD
baselines' D is not of that form, and the bound is loose across layers). The per-sequence samples kept
here give the first-order term exactly, for any factorisation, at the cost of holding the calibration
tokens' X (per activation) and G (per GEMM output): tokens × (K + N) floats per GEMM. At 7B width that
is too much for all blocks at once — the score of a unit needs only its own block's samples, so a
block-sequential calibration scores and drops them block by block (or calibrate on fewer tokens:
``max_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from espace_export.calibration.gradients import output_loss, resolve_loss
from espace_export.calibration.statistics import distinct_activations
from espace_export.errors import EspaceError
from espace_export.io.data import InputSpec, complete_feed, input_specs
from espace_export.selection.factorizations import Factorization
from graph_passes.find import SUBGRAPH_SEPARATOR, GemmTarget

FisherLoss = Literal["auto", "sampled", "next-token", "cosine", "probe"]


def resolve_fisher_loss(
    model: onnx.ModelProto, loss: FisherLoss = "auto"
) -> Literal["sampled", "next-token", "cosine", "probe"]:
    """``auto``: the loss whose Fisher is the Hessian of ``--select validate``'s default loss — ``sampled``
    for causal LMs (first output ``logits`` of rank 3: KL), ``cosine`` otherwise (1 − cos of output rows)."""
    if loss != "auto":
        return loss
    return "sampled" if resolve_loss(model, "auto") == "next-token" else "cosine"


def cosine_probe_loss(output: Any, feed: dict[str, np.ndarray], seed: int) -> Any:
    """⟨r, y⟩ with a probe r whose Gauss–Newton matrix is the Hessian of the mean 1 − cos(y, y₀) of the
    output rows at y = y₀: per row ``r = (I − ŷŷᵀ) z / ‖y₀‖`` with z Gaussian, so E_z[⟨r, Δy⟩²] =
    ‖Δy⊥‖²/‖y₀‖² = 2 (1 − cos) to second order — a change along a row counts for nothing, and a row counts by
    its angle, not its size (an isotropic probe weighs rows by ‖y₀‖² and counts the change along them)."""
    import torch

    reference = output.detach().double()
    norms = reference.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    unit = reference / norms
    z = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    probe = (z - (z * unit).sum(dim=-1, keepdim=True) * unit) / norms
    mask = feed.get("attention_mask")
    if mask is not None and output.dim() == 3 and tuple(output.shape[:2]) == mask.shape:
        probe = probe * torch.from_numpy(np.asarray(mask)).to(probe.dtype)[..., None]
    return (probe.to(output.dtype) * output).sum()


def sampled_labels(logits: Any, seed: int) -> Any:
    """One label per position drawn from the model's own next-token distribution (fixed seed)."""
    import torch

    probabilities = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(probabilities, 1, generator=generator).reshape(logits.shape[:-1])


def fisher_loss(kind: str, output: Any, feed: dict[str, np.ndarray], seed: int) -> Any:
    """The scalar whose per-sequence gradients :func:`collect_fisher_samples` keeps.

    ``sampled``: Σ over valid positions of −log p(ŷ) with ŷ drawn from the model's own distribution, so
    that E_ŷ[gradient outer product] is the true Fisher of the next-token distribution — the Hessian of
    the KL validation (``--valid-loss kl``) — and the cross terms between positions vanish in
    expectation (E_ŷ[∇ log p(ŷ)] = 0). ``cosine``: :func:`cosine_probe_loss`, the same for the encoders'
    1 − cos validation. ``next-token`` (the data's labels: the empirical Fisher) and ``probe`` (isotropic:
    the Gauss–Newton of ½‖y − y₀‖²) are :func:`espace_export.gradients.output_loss`'s.
    """
    import torch

    if kind == "cosine":
        return cosine_probe_loss(output, feed, seed)
    if kind != "sampled":
        return output_loss(kind, output, feed, seed)  # type: ignore[arg-type]
    log_p = torch.log_softmax(output.double(), dim=-1)
    labels = sampled_labels(output, seed)
    picked = -log_p.gather(-1, labels[..., None])[..., 0]
    mask = feed.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(picked.shape):
        picked = picked * torch.from_numpy(np.asarray(mask)).to(picked.dtype)
    return picked.sum()


@dataclass
class FisherSamples:
    """Per-token activations and GEMM-output gradients of the calibration sequences.

    ``X[activation]``: T×K (float32), ``G[target]``: T×N (float32, ∂ℓ/∂Y of that GEMM), the rows of all
    sequences stacked; sequence s owns rows ``offsets[s]:offsets[s + 1]``.
    """

    X: dict[str, np.ndarray]
    G: dict[str, np.ndarray]  # R×T×N: one T×N gradient per probe (R = ``probes``)
    offsets: np.ndarray
    activation_of: dict[str, str]
    loss: str
    per_sequence: bool = False  # the output has one row per sequence (a pooled embedding), not one per token
    # the sequence each row of X[activation] (and of G of the GEMMs reading it) belongs to: its rows need not
    # be the tokens of ``offsets`` (a pooler reads one row per sequence)
    sequence_of: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def items(self) -> int:
        """What the validation loss averages over: output rows — sequences for a pooled output, else tokens."""
        return self.sequences if self.per_sequence else self.tokens

    @property
    def sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def probes(self) -> int:
        """Gradients kept per row: one per probe (or label draw)."""
        return next(iter(self.G.values())).shape[0] if self.G else 1


def gemm_output(model: onnx.ModelProto, target: GemmTarget) -> str:
    """The tensor the target's MatMul/Gemm node produces (X·W, plus the bias for a Gemm: same gradient).

    A GEMM fused into another operator (com.microsoft Attention's packed QKV weight) has no such tensor:
    refused, naming the layer."""
    inner = target.node.split(SUBGRAPH_SEPARATOR)[-1]  # a copy inlined from an If branch is renamed <If>/<node>
    node = next((n for n in model.graph.node if n.name == target.node), None) or next(
        (n for n in model.graph.node if n.name.endswith("/" + inner) and target.activation in n.input), None
    )
    if node is None:
        raise ValueError(f"node {target.node} of {target.name} not in the graph")
    if node.op_type not in _GEMM_OPS:
        raise EspaceError(
            f"--select fisher cannot score layer {target.name}: its X·W is computed inside a {node.op_type} "
            "node, so no gradient of it can be taken",
            "use --select validate or proxy",
        )
    return str(node.output[0])


_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul")


def fused_gemms(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> list[str]:
    """The targets whose X·W is computed inside another operator (com.microsoft Attention's packed QKV
    weight): no gradient of it can be taken, so ``--select fisher`` cannot score them."""
    ops = {node.name: node.op_type for node in model.graph.node}
    return [t.name for t in targets if ops.get(t.node, "MatMul") not in _GEMM_OPS]


@dataclass(frozen=True)
class FisherSettings:
    """How :func:`collect_fisher_samples` samples: the loss (:func:`fisher_loss`; ``auto`` mirrors the
    validation loss), the seed of the probes / label draws (``seed + batch · probes + probe``),
    ``max_tokens`` (stop once that many tokens are held, whole sequences: memory ``max_tokens × (K + probes·N)``
    floats per GEMM) and ``probes``, backward passes per batch, each with its own probe or label draw: the
    estimate's variance falls as 1/(probes × sequences), which matters where there are few sequences."""

    loss: FisherLoss = "auto"
    seed: int = 0
    max_tokens: int | None = None
    probes: int = 1


def collect_fisher_samples(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    settings: FisherSettings = FisherSettings(),
    *,
    specs: Sequence[InputSpec] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> FisherSamples:
    """One forward + backward pass of the ONNX graph (evaluated with torch ops) over ``batches``: each
    targeted GEMM's input rows and output gradients, per valid token, for :func:`fisher_harm`.

    The loss (:func:`fisher_loss`): for causal LMs the cross-entropy against labels sampled from the model
    itself (``sampled``, the true Fisher of the KL validation); otherwise a Gaussian output probe shaped so
    that its Gauss–Newton matrix is the Hessian of the 1 − cos validation (``cosine``); see
    :class:`FisherSettings`. GEMMs inside If branches (merged decoders) are sampled on the branch the batches
    select, inlined, under their own layer names.
    """
    from espace_export.calibration.gradients import _graph_forward, _prefill_view
    from espace_export.calibration.onnx_torch import TorchGraph

    specs = list(specs) if specs is not None else input_specs(model)
    kind = resolve_fisher_loss(model, settings.loss)
    model, targets, _ = _prefill_view(model, targets, batches, specs)
    activations = distinct_activations(targets)
    outputs = {t.name: gemm_output(model, t) for t in targets}
    forward = _graph_forward(TorchGraph(model), set(activations) | set(outputs.values()))
    rows = _Rows(activations, targets, settings.probes)
    per_sequence = False
    for index, batch in enumerate(batches):
        if settings.max_tokens is not None and sum(rows.lengths) >= settings.max_tokens:
            break
        feed = complete_feed(batch, specs)
        output, tracked = forward(feed)
        per_sequence = output.dim() <= 2
        missing = [t.name for t in targets if outputs[t.name] not in tracked or t.activation not in tracked]
        if missing:
            raise EspaceError(
                f"the Fisher pass did not reach layer {missing[0]}", "check the model with --select validate"
            )
        layout = _RowLayout(feed)
        rows.add_inputs(tracked, layout)
        for probe in range(settings.probes):
            objective = fisher_loss(kind, output, feed, settings.seed + index * settings.probes + probe)
            rows.add_gradients(objective, {t.name: tracked[outputs[t.name]] for t in targets}, layout, probe)
        if on_batch is not None:
            on_batch()
    return rows.samples(targets, kind, per_sequence)


class _Rows:
    """The rows :func:`collect_fisher_samples` keeps, batch by batch."""

    def __init__(self, activations: dict[str, tuple[int, int]], targets: Sequence[GemmTarget], probes: int) -> None:
        self.activations = activations
        self.width = {t.name: t.N for t in targets}
        self.first = targets[0]
        self.probes = probes
        self.X: dict[str, list[np.ndarray]] = {a: [] for a in activations}
        self.G: dict[str, list[list[np.ndarray]]] = {t.name: [[] for _ in range(probes)] for t in targets}
        self.sequence_of: dict[str, list[np.ndarray]] = {a: [] for a in activations}
        self.lengths: list[int] = []

    def add_inputs(self, tracked: dict[str, Any], layout: _RowLayout) -> None:
        first = len(self.lengths)
        self.lengths += [int(valid.sum()) for valid in layout.of(tracked[self.first.activation], self.first.K)]
        for activation, (K, _) in self.activations.items():
            masks = layout.of(tracked[activation], K)
            self.X[activation] += _split(tracked[activation].detach().numpy(), K, masks)
            self.sequence_of[activation] += [np.full(int(v.sum()), first + s) for s, v in enumerate(masks)]

    def add_gradients(self, objective: Any, values: dict[str, Any], layout: _RowLayout, probe: int) -> None:
        import torch

        names = list(values)
        grads = torch.autograd.grad(
            objective, [values[n] for n in names], allow_unused=True, retain_graph=probe < self.probes - 1
        )
        for name, grad in zip(names, grads, strict=True):
            G = np.zeros(values[name].shape, dtype=np.float32) if grad is None else grad.numpy()
            self.G[name][probe] += _split(G, self.width[name], layout.of(values[name], self.width[name]))

    def samples(self, targets: Sequence[GemmTarget], kind: str, per_sequence: bool) -> FisherSamples:
        # each tensor's per-sequence pieces are dropped as soon as they are joined: the samples are held
        # once (plus one tensor), not twice
        X = {a: np.concatenate(self.X.pop(a)).astype(np.float32, copy=False) for a in list(self.X)}
        G = {}
        for name in list(self.G):
            per_probe = self.G.pop(name)
            G[name] = np.empty((len(per_probe), sum(len(r) for r in per_probe[0]), self.width[name]), np.float32)
            for probe, pieces in enumerate(per_probe):
                if pieces:
                    np.concatenate(pieces, out=G[name][probe])
                pieces.clear()
        return FisherSamples(
            X=X,
            G=G,
            offsets=np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64),
            activation_of={t.name: t.activation for t in targets},
            loss=kind,
            per_sequence=per_sequence,
            sequence_of={a: np.concatenate(ids).astype(np.int64) for a, ids in self.sequence_of.items()},
        )


def sequence_count(batches: Sequence[dict[str, np.ndarray]]) -> int:
    """How many sequences ``batches`` hold, by the rule :func:`collect_fisher_samples` splits rows with
    (the attention mask's rows, else the input ids', else one per batch)."""
    return sum(_RowLayout(batch).batch for batch in batches)


class _RowLayout:
    """Which rows of a batch's tensor each sequence owns (padding left out), whatever the tensor's layout."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.mask = feed.get("attention_mask")
        ids = self.mask if self.mask is not None else feed.get("input_ids")
        self.batch = int(np.asarray(ids).shape[0]) if ids is not None and np.ndim(ids) >= 1 else 1

    def of(self, X: Any, K: int) -> list[np.ndarray]:
        """One boolean row selector per sequence: by the attention mask where X has a row per token, every
        row where X has the same number per sequence (one per sequence: a pooler), else one sequence."""
        rows = X.numel() // K
        if self.mask is not None and self.mask.size == rows:
            return [np.asarray(row).astype(bool) for row in np.asarray(self.mask)]
        if rows % self.batch == 0:
            return [np.ones(rows // self.batch, dtype=bool)] * self.batch
        return [np.ones(rows, dtype=bool)]


def _split(A: np.ndarray, width: int, masks: list[np.ndarray]) -> list[np.ndarray]:
    rows = A.reshape(len(masks), -1, width)
    return [rows[s][valid] for s, valid in enumerate(masks)]


def first_order_changes(samples: FisherSamples, deltas: Mapping[str, np.ndarray]) -> np.ndarray:
    """Δℓ_s ≈ Σ_j ⟨X_sᵀG_{j,s}, D_j⟩ per sequence and probe (probe-major: R·S values), for weight changes
    ``deltas`` (layer → K×N D_j = A·B − W_j)."""
    changes = np.zeros((samples.probes, samples.sequences), dtype=np.float64)
    for name, D in deltas.items():
        activation = samples.activation_of[name]
        XD = samples.X[activation] @ np.asarray(D, dtype=np.float32)
        per_row = np.einsum("tn,rtn->rt", XD, samples.G[name], dtype=np.float64)
        sequence = samples.sequence_of[activation]
        for probe in range(samples.probes):
            changes[probe] += np.bincount(sequence, weights=per_row[probe], minlength=samples.sequences)
    return changes.reshape(-1)


def fisher_harm(
    samples: FisherSamples, weights: Mapping[str, np.ndarray], factorizations: Mapping[str, Factorization]
) -> float:
    """``½ Σ_s Δℓ_s² / items``: the Fisher estimate of the divergence (per output row: per token, or per
    sequence for a pooled output — what the validation loss averages) that replacing each
    layer's weight ``weights[name]`` by ``factorizations[name]`` alone causes (see the module docstring).
    Zero for an exact rewrite, grows with the error of every layer in a unit together (siblings sum
    inside Δℓ_s, so their errors may add or cancel as they do in the network)."""
    deltas = {name: f.weight() - weights[name] for name, f in factorizations.items()}
    changes = first_order_changes(samples, deltas)
    return 0.5 * float(np.sum(changes**2)) / max(samples.items * samples.probes, 1)


__all__ = [
    "FisherSamples",
    "FisherSettings",
    "collect_fisher_samples",
    "first_order_changes",
    "fisher_harm",
    "cosine_probe_loss",
    "fisher_loss",
    "fused_gemms",
    "gemm_output",
    "resolve_fisher_loss",
    "sequence_count",
]
