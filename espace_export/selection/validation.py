"""Validation loss of the model with some layers' weights swapped, from one ONNX Runtime session.

Per-layer selection (paper §4.2, appendix C) measures the validation loss with one layer projected at a
time, for every layer and candidate. Building a session per trial would cost more than the trials, so the
model is rewritten once: each targeted GEMM reads its weight from a new graph input
(``espace.weight.<i>``) instead of its initializer. A trial then feeds ``A·B`` (the K×N matrix a
projected pair computes: ``(X·A)·B = X·(A·B)``) for the layers under test and the original weights for
the rest — same session, same cost as one plain validation pass.

Losses (:func:`validation_loss`), each the mean over the valid items of the validation batches:

* ``kl`` (default for causal LMs, first output ``logits``): KL(original ‖ trial) of the next-token
  distributions — zero for the uncompressed model, and blind to how well the model fits the validation
  text, so a trial that happens to fit it better (a low-rank weight acting as a regulariser on a small,
  overfit model) scores as a change, not as a gain. On the tiny LM of ``samples/train_lm.py`` it chose
  better layers than the cross-entropy (``benchmarks/accuracy.py``).
* ``next-token`` for causal LMs on request (the paper's validation perplexity): next-token
  cross-entropy (exp of it is the perplexity).
* ``distill`` otherwise: ``1 − cos`` between each output row (token or sentence embedding) and the
  original model's, so the uncompressed model scores 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx

from espace_export.io.data import InputSpec, complete_feed, input_specs, is_causal_lm
from graph_passes.find import GemmTarget, weight_matrix

ValidationLoss = Literal["next-token", "kl", "distill"]
WEIGHT_INPUT = "espace.weight.{}"


VALIDATION_LOSSES = ("auto", "next-token", "kl", "distill")


def resolve_validation_loss(model: onnx.ModelProto, loss: str = "auto") -> ValidationLoss:
    """``auto``: how far the trial moved from the original model — ``kl`` for a causal LM (first output
    ``logits``, rank 3), ``distill`` otherwise. ``next-token`` (the paper's validation perplexity) on request."""
    from espace_export.errors import EspaceError

    if loss not in VALIDATION_LOSSES:
        raise EspaceError(f"unknown validation loss {loss!r}", f"use one of {', '.join(VALIDATION_LOSSES)}")
    causal = is_causal_lm(model)
    if loss == "auto":
        return "kl" if causal else "distill"
    if loss in ("next-token", "kl") and not causal:
        raise EspaceError(
            f"validation loss {loss} needs a causal LM whose first output is logits [batch, seq, vocab]",
            "use --valid-loss distill (or auto) for this model",
        )
    return loss  # type: ignore[return-value]


def node_view(target: GemmTarget, W: np.ndarray) -> np.ndarray:
    """``W`` (K×N) laid out as the GEMM node reads its second input (N×K for Gemm with transB)."""
    return W.T if target.pattern == "gemm" and target.stored_transposed else W


def with_weight_inputs(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> onnx.ModelProto:
    """A copy of ``model`` whose targeted GEMMs read their weight from graph inputs ``espace.weight.<i>``
    (every copy of a target: its node and, in the branches of a merged decoder, ``target.also``, which read
    the main-graph input from inside their bodies)."""
    from graph_passes.find import nodes_by_path
    from graph_passes.project import remove_unused_constants

    switched = onnx.ModelProto()
    switched.CopyFrom(model)
    nodes = nodes_by_path(switched)
    for index, target in enumerate(targets):
        name = WEIGHT_INPUT.format(index)
        for path, _ in target.occurrences:
            nodes[path][1].input[1] = name
        shape = (target.N, target.K) if target.pattern == "gemm" and target.stored_transposed else (target.K, target.N)
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(target.dtype))
        switched.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(shape)))
    remove_unused_constants(switched)
    return switched


class Validator:
    """Validation loss of the model under weight overrides, on fixed batches, from one session."""

    def __init__(
        self,
        model: onnx.ModelProto,
        targets: Sequence[GemmTarget],
        batches: Sequence[dict[str, np.ndarray]],
        *,
        loss: str = "auto",
        specs: Sequence[InputSpec] | None = None,
        session_factory: Callable[[onnx.ModelProto], Any] | None = None,
    ) -> None:
        from espace_export.runtime import ort_session

        specs = list(specs) if specs is not None else input_specs(model)
        self.targets = list(targets)
        self.index = {t.name: i for i, t in enumerate(self.targets)}
        self.loss = resolve_validation_loss(model, loss)
        self.weights = {t.name: np.ascontiguousarray(node_view(t, weight_matrix(model, t))) for t in self.targets}
        self.feeds = [complete_feed(batch, specs) for batch in batches]
        self.session = (session_factory or ort_session)(with_weight_inputs(model, self.targets))
        self.output = model.graph.output[0].name
        self.passes = 0
        self.references: list[np.ndarray] = []
        if self.loss in ("distill", "kl"):
            self.references = [self._run(feed, {}) for feed in self.feeds]
        self.baseline = self.evaluate({})

    def _run(self, feed: dict[str, np.ndarray], overrides: Mapping[str, np.ndarray]) -> np.ndarray:
        weights = {
            WEIGHT_INPUT.format(i): overrides.get(t.name, self.weights[t.name]) for i, t in enumerate(self.targets)
        }
        return self.session.run([self.output], {**feed, **weights})[0]

    def effective(self, name: str, W: np.ndarray) -> np.ndarray:
        """The override array for layer ``name`` given its K×N effective weight."""
        target = self.targets[self.index[name]]
        return np.ascontiguousarray(node_view(target, W).astype(np.dtype(target.dtype)))

    def evaluate(self, overrides: Mapping[str, np.ndarray]) -> float:
        """The validation loss with layer name → effective K×N weight overrides (see :meth:`effective`)."""
        self.passes += 1
        total, count = 0.0, 0
        for i, feed in enumerate(self.feeds):
            out = self._run(feed, overrides)
            value, n = validation_loss(self.loss, out, feed, self.references[i] if self.references else None)
            total += value
            count += n
        return total / max(count, 1)


def validation_loss(
    kind: ValidationLoss, output: np.ndarray, feed: dict[str, np.ndarray], reference: np.ndarray | None
) -> tuple[float, int]:
    """(sum of the per-item losses, number of items) for one batch."""
    mask = feed.get("attention_mask")
    if kind == "next-token":
        logits = np.asarray(output[:, :-1], dtype=np.float64)
        targets = np.asarray(feed["input_ids"])[:, 1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
        nll = log_norm - picked
        valid = np.ones_like(nll, dtype=bool) if mask is None else (mask[:, 1:] * mask[:, :-1]).astype(bool)
        return float(nll[valid].sum()), int(valid.sum())
    assert reference is not None
    if kind == "kl":
        log_q = _log_softmax(output)
        log_p = _log_softmax(reference)
        kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        valid = np.ones(kl.shape, dtype=bool) if mask is None else mask.astype(bool).reshape(kl.shape)
        return float(kl[valid].sum()), int(valid.sum())
    a = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    b = np.asarray(output, dtype=np.float64).reshape(a.shape)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    valid = np.ones(len(cos), dtype=bool)
    if mask is not None and output.ndim == 3 and mask.size == len(cos):
        valid = mask.reshape(-1).astype(bool)
    return float((1.0 - cos[valid]).sum()), int(valid.sum())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
