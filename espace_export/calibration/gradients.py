"""Activation gradients for the NL-MSE candidates (paper Theorem 4, appendix A.4).

For every distinct activation X feeding a targeted GEMM, and every calibration sequence i with M valid
tokens, the NL-MSE statistic is

    C(i) = (XᵢᵀXᵢ GᵢᵀGᵢ + GᵢᵀGᵢ XᵢᵀXᵢ) / M²          Gᵢ = ∂loss/∂Xᵢ  (M×K, a row per token)

averaged over sequences; the ``-l2`` variant L2-normalises each row of X and of G first. This module
accumulates ``E[XᵀX GᵀG]/M²`` (one triangle of the symmetric sum; :func:`candidates.nl_mse_matrix`
adds the transpose) in float64.

How it is reduced: a batch at a time, in torch, on the device that holds the tensors. Per sequence
``XᵀX GᵀG = Xᵀ (X Gᵀ) G``: the M×M matrix ``X Gᵀ``, then ``W = (X Gᵀ) G / M²`` (M×K), and the sum over
the batch's sequences ``Σᵢ XᵢᵀWᵢ`` is one (K × ΣM)·(ΣM × K) GEMM — ``4M²K + 2MK²`` FLOPs per sequence
instead of the ``4MK² + 2K³`` of forming the two K×K products (which :func:`batch_statistic` still
uses when M is so much larger than K that it is cheaper). :func:`sequence_statistic` is the
per-sequence reference the tests hold the batched form to.

Where the gradient comes from: the ONNX graph itself, evaluated with torch ops
(:mod:`espace_export.calibration.onnx_torch`) so autograd works — or the user's own PyTorch module, hooked by layer
name, when they have it.

The loss (``loss=``):

* ``next-token`` — causal LMs (an output named ``logits`` of rank 3): the sum over valid tokens of the
  next-token cross-entropy (labels are the inputs shifted by one, padding excluded). The paper's loss.
* ``probe`` — everything else (encoders, sentence embeddings). Self-distillation ``‖y − y₀‖²`` against the
  model's own output has zero gradient at y = y₀, so it carries no information. Instead each sequence
  gets a random Gaussian probe r (fixed by the seed) and the loss ``⟨r, y⟩`` summed over output rows:
  ``E_r[g gᵀ] = J Jᵀ``, the Gauss–Newton matrix of the distillation loss ``½‖y − y₀‖²`` (for an
  L2-normalised embedding that is ``1 − cos`` to second order). So NL-MSE weighs activation directions
  by how much they move the output — the same second-order quantity the validation metric measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from espace_export.calibration.statistics import StatsPrecision, distinct_activations, prefill_view
from espace_export.errors import EspaceError
from espace_export.io.data import InputSpec, complete_feed, input_specs, is_causal_lm
from graph_passes.find import GemmTarget

GradientLoss = Literal["auto", "next-token", "probe"]


@dataclass
class GradientStats:
    """Running sums of ``XᵀX GᵀG / M²`` over sequences for one activation of width K."""

    K: int
    normalized: bool = True
    sum_xg: np.ndarray = field(init=False)
    sum_xg_normalized: np.ndarray = field(init=False)
    sequences: int = 0

    def __post_init__(self) -> None:
        self.sum_xg = np.zeros((self.K, self.K), dtype=np.float64)
        self.sum_xg_normalized = np.zeros((self.K, self.K), dtype=np.float64)

    def add(self, X: np.ndarray, G: np.ndarray) -> None:
        """One sequence: its valid rows X (M×K) and their gradients G (M×K); the gradient of an all-zero
        row of X is dropped (see :func:`batch_statistic`)."""
        if X.shape[0] == 0:
            return
        G = np.where(np.asarray(X).any(axis=1, keepdims=True), G, 0.0)
        self.sum_xg += sequence_statistic(X, G)
        if self.normalized:
            self.sum_xg_normalized += sequence_statistic(_unit_rows(X), _unit_rows(G))
        self.sequences += 1

    def add_batch(self, X: Any, G: Any, mask: Any = None, *, precision: StatsPrecision = "float64") -> None:
        """A batch of sequences at once: X and G ``[batch, seq, K]`` (torch tensors or arrays).

        ``mask`` (``[batch, seq]``, 0 for padding) leaves padding rows out; M is each sequence's count
        of valid rows, and sequences without one are not counted. ``precision``: the dtype of the
        batch's products (``float64`` matches :meth:`add` to round-off); the sums are float64 either way.
        """
        plain, normalized, sequences = batch_statistic(X, G, mask, normalized=self.normalized, precision=precision)
        _accumulate(self.sum_xg, plain)
        if normalized is not None:
            _accumulate(self.sum_xg_normalized, normalized)
        self.sequences += sequences

    def merge(self, other: GradientStats) -> None:
        self.sum_xg += other.sum_xg
        self.sum_xg_normalized += other.sum_xg_normalized
        self.sequences += other.sequences

    @property
    def C_XG(self) -> np.ndarray:
        """``E[XᵀX GᵀG] / M²`` (pass to :func:`espace_export.selection.candidates.nl_mse_matrix`)."""
        return self.sum_xg / max(self.sequences, 1)

    @property
    def C_XG_normalized(self) -> np.ndarray:
        if not self.normalized:
            raise ValueError("normalized gradient statistics were not collected")
        return self.sum_xg_normalized / max(self.sequences, 1)


def sequence_statistic(X: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``XᵀX GᵀG / M²`` for one sequence (float64)."""
    X = np.asarray(X, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    M = X.shape[0]
    return (X.T @ X) @ (G.T @ G) / (M * M)


def batch_statistic(
    X: Any, G: Any, mask: Any = None, *, normalized: bool = False, precision: StatsPrecision = "float64"
) -> tuple[Any, Any, int]:
    """``Σᵢ XᵢᵀXᵢ GᵢᵀGᵢ / Mᵢ²`` over the sequences of a batch, with batched GEMMs.

    ``X``, ``G``: ``[batch, seq, K]``; ``mask``: ``[batch, seq]`` or None (every row valid). Returns the
    plain sum, the sum over L2-normalised rows (None unless ``normalized``) — both K×K float64 torch
    tensors on X's device — and the number of sequences with at least one valid row.

    The gradient of a row whose activation is all zero is dropped (the row still counts in M). Its NL-MSE
    error ``⟨g, x − PPᵀx⟩`` is 0 for every P, so its gradient says nothing about P; but the per-sequence
    form ``XᵀX GᵀG`` would pair that gradient with the other rows' activations. Such rows do occur with huge
    gradients: a token whose residual stream is exactly zero (a zero embedding row, e.g. the pad token
    of a model trained with ``padding_idx``, at the first position of a window) meets RMSNorm where its
    derivative is ``1/√eps``, and the gradient grows about that much per norm towards the input
    (benchmarks/README.md: 2.6e11 against a median of 7 on the tiny LM, which wrecked its nl-mse).
    """
    import torch

    dtype = torch.float64 if precision == "float64" else torch.float32
    X = torch.as_tensor(X).to(dtype)
    G = torch.as_tensor(G).to(device=X.device, dtype=dtype)
    if mask is None:
        lengths = torch.full((X.shape[0],), X.shape[1], dtype=dtype, device=X.device)
    else:
        valid = torch.as_tensor(mask).to(X.device) != 0
        # where, not a product: activations at padded positions may be inf or NaN
        X = torch.where(valid[..., None], X, X.new_zeros(()))
        lengths = valid.sum(dim=1).to(dtype)
    G = torch.where((X != 0).any(dim=-1, keepdim=True), G, G.new_zeros(()))  # padding rows too
    sequences = int((lengths > 0).sum())
    scale = torch.where(lengths > 0, 1.0 / lengths.clamp(min=1) ** 2, lengths.new_zeros(()))
    plain = _sum_of_products(X, G, scale)
    if not normalized:
        return plain, None, sequences
    return plain, _sum_of_products(_unit_rows_torch(X), _unit_rows_torch(G), scale), sequences


def _sum_of_products(X: Any, G: Any, scale: Any) -> Any:
    """``Σᵢ scaleᵢ XᵢᵀXᵢ GᵢᵀGᵢ`` (padding rows already zero), in float64, by the cheaper association."""
    import torch

    batch, M, K = X.shape
    if 4 * M * M * K + 2 * M * K * K <= 4 * M * K * K + 2 * K**3:
        W = torch.bmm(torch.bmm(X, G.transpose(1, 2)), G) * scale[:, None, None]  # (X Gᵀ) G / M², batch×M×K
        return (X.reshape(-1, K).T @ W.reshape(-1, K)).to(torch.float64)
    total = X.new_zeros((K, K), dtype=torch.float64)
    for x, g, s in zip(X, G, scale, strict=True):  # M ≫ K: the two K×K products are cheaper
        total += ((x.T @ x) @ (g.T @ g) * s).to(torch.float64)
    return total


def _unit_rows_torch(A: Any) -> Any:
    """Each row over its L2 norm; zero rows (padding) stay zero."""
    import torch

    norms = A.norm(dim=-1, keepdim=True)
    positive = norms > 0
    return torch.where(positive, A / torch.where(positive, norms, norms.new_ones(())), A.new_zeros(()))


def _accumulate(total: np.ndarray, value: Any) -> None:
    """Add a float64 torch tensor into a float64 numpy array in place (no copy on the CPU)."""
    import torch

    torch.from_numpy(total).add_(value.detach().to("cpu", torch.float64))


def _unit_rows(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return np.divide(A, norms, out=np.zeros_like(A), where=norms > 0)


def resolve_loss(model: onnx.ModelProto, loss: GradientLoss) -> Literal["next-token", "probe"]:
    """``auto``: next-token cross-entropy when the first output is ``logits`` of rank 3, else the probe."""
    if loss != "auto":
        return loss
    return "next-token" if is_causal_lm(model) else "probe"


def output_loss(kind: Literal["next-token", "probe"], output: Any, feed: dict[str, np.ndarray], seed: int) -> Any:
    """The scalar whose gradient is taken (a sum over sequences, so each sequence keeps its own gradient)."""
    import torch

    mask = feed.get("attention_mask")
    if kind == "next-token":
        ids = torch.from_numpy(np.asarray(feed["input_ids"], dtype=np.int64))
        logits = output[:, :-1] if output.dtype in (torch.float32, torch.float64) else output[:, :-1].float()
        targets = ids[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).reshape(targets.shape)
        if mask is not None:
            valid = torch.from_numpy(np.asarray(mask)[:, 1:] * np.asarray(mask)[:, :-1]).to(losses.dtype)
            losses = losses * valid
        return losses.sum()
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    if mask is not None and output.dim() == 3 and tuple(output.shape[:2]) == mask.shape:
        probe = probe * torch.from_numpy(np.asarray(mask)).to(output.dtype)[..., None]
    return (probe * output).sum()


@dataclass(frozen=True)
class GradientSettings:
    """How the NL-MSE statistics are formed: the loss, the normalised twin, the seed of random probe
    directions (``seed + batch index``), and the dtype of each batch's products (sums are float64)."""

    loss: GradientLoss = "auto"
    normalized: bool = True
    seed: int = 0
    precision: StatsPrecision = "float64"


def collect_gradient_statistics(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    settings: GradientSettings = GradientSettings(),
    *,
    specs: Sequence[InputSpec] | None = None,
    on_batch: Callable[[], None] | None = None,
    torch_module: Any = None,
) -> dict[str, GradientStats]:
    """NL-MSE statistics of every distinct activation the ``targets`` read, over ``batches``.

    ``torch_module``: the original PyTorch model (called as ``module(**feed)`` with the ONNX input names,
    returning the ONNX output or an object with ``.logits``); its submodules named like the targets are
    hooked. Without it the ONNX graph is evaluated with torch ops.

    One forward and one backward pass per batch (``autograd.grad`` of the batch's loss with respect to
    every tracked activation at once); each batch is reduced by :meth:`GradientStats.add_batch` while
    its tensors are in memory (:class:`GradientSettings`).
    """
    import torch

    specs = list(specs) if specs is not None else input_specs(model)
    if torch_module is None:  # GEMMs inside If branches (merged decoders): the branch the batches select, inlined
        view, measured, keys = _prefill_view(model, targets, batches, specs)
        if keys:
            stats = collect_gradient_statistics(view, measured, batches, settings, specs=specs, on_batch=on_batch)
            return {original: stats[inlined] for original, inlined in keys.items()}
    kind = resolve_loss(model, settings.loss)
    widths = {name: K for name, (K, _) in distinct_activations(targets).items()}
    stats = {name: GradientStats(K, settings.normalized) for name, K in widths.items()}
    if torch_module is not None:
        forward = _module_forward(torch_module, targets)
    else:
        from espace_export.calibration.onnx_torch import TorchGraph

        forward = _graph_forward(TorchGraph(model), set(widths))
    for index, batch in enumerate(batches):
        feed = complete_feed(batch, specs)
        output, tracked = forward(feed)
        objective = output_loss(kind, output, feed, settings.seed + index)
        names = [n for n in widths if n in tracked]
        grads = torch.autograd.grad(objective, [tracked[n] for n in names], allow_unused=True)
        mask = feed.get("attention_mask")
        with torch.no_grad():
            for name, value, grad in zip(names, (tracked[n] for n in names), grads, strict=True):
                value = value.detach()
                _reduce_sequences(
                    stats[name], value, torch.zeros_like(value) if grad is None else grad, mask, settings.precision
                )
        if on_batch is not None:
            on_batch()
    missing = [n for n, s in stats.items() if s.sequences == 0]
    if missing and len(batches):
        raise EspaceError(
            f"no gradient reached activation {missing[0]} during calibration",
            "check that the model output depends on it",
        )
    return stats


def _prefill_view(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    specs: Sequence[InputSpec],
) -> tuple[onnx.ModelProto, list[GemmTarget], dict[str, str]]:
    """:func:`espace_export.calibration.statistics.prefill_view` with ONNX Runtime probing the conditions."""
    from espace_export.runtime import ort_session

    return prefill_view(ort_session, model, targets, batches, specs)


def _reduce_sequences(stats: GradientStats, X: Any, G: Any, mask: Any, precision: StatsPrecision = "float64") -> None:
    """Split a batch's activation into sequences (by the attention mask when it lines up) and add them."""
    K = stats.K
    size = X.numel() if hasattr(X, "numel") else X.size
    if mask is not None and size == np.asarray(mask).size * K:
        shape = (*np.asarray(mask).shape, K)
        stats.add_batch(X.reshape(shape), G.reshape(shape), mask, precision=precision)
    elif X.ndim >= 3:  # [batch, seq, K] without a usable mask
        stats.add_batch(X.reshape(X.shape[0], -1, K), G.reshape(G.shape[0], -1, K), precision=precision)
    else:  # one sequence
        stats.add_batch(X.reshape(1, -1, K), G.reshape(1, -1, K), precision=precision)


def _graph_forward(graph: Any, watched: set[str]) -> Callable[[dict[str, np.ndarray]], tuple[Any, dict[str, Any]]]:
    def forward(feed: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        tracked: dict[str, Any] = {}

        def watch(name: str, value: Any) -> Any:
            if name in watched:
                # the first watched tensor becomes a leaf; later ones are already on the autograd graph
                if not value.requires_grad:
                    value = value.detach().requires_grad_(True)
                tracked[name] = value
            return value

        outputs = graph.run(feed, watch=watch)
        return next(iter(outputs.values())), tracked

    return forward


def _module_forward(
    module: Any, targets: Sequence[GemmTarget]
) -> Callable[[dict[str, np.ndarray]], tuple[Any, dict[str, Any]]]:
    """Hook the submodules named like the targets; their first positional input is the activation."""
    import torch

    submodules = dict(module.named_modules())
    modules: dict[str, Any] = {}
    for target in targets:
        # exported wrappers add a prefix ("model." around an HF model): accept the name with or without it
        sub = submodules.get(target.name) or submodules.get(target.name.split(".", 1)[-1])
        if sub is None:
            raise EspaceError(
                f"the PyTorch module has no submodule named {target.name}",
                "pass the module that was exported (same wrapper), or leave it out to use the ONNX graph",
            )
        modules[target.name] = sub

    def forward(feed: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        tracked: dict[str, Any] = {}
        originals: dict[str, Any] = {}
        handles = []
        for target in targets:
            sub = modules[target.name]

            def hook(_mod: Any, args: tuple[Any, ...], name: str = target.activation) -> tuple[Any, ...]:
                x = args[0]
                if name in originals and originals[name] is x:  # a sibling reads the same tensor
                    return (tracked[name], *args[1:])
                # the first tracked tensor becomes a leaf; later ones are already on the autograd graph
                originals[name] = x
                tracked[name] = x if x.requires_grad else x.detach().requires_grad_(True)
                return (tracked[name], *args[1:])

            handles.append(sub.register_forward_pre_hook(hook))
        try:
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
            with torch.enable_grad():
                out = module(**tensors)
        finally:
            for handle in handles:
                handle.remove()
        out = getattr(out, "logits", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out, tracked

    return forward
