"""Output fidelity of a compressed model against the original, on held-out batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from espace_export.io.data import (
    complete_feed,
)


def output_fidelity(
    original: object, compressed: object, batches: Sequence[dict[str, np.ndarray]], specs: Sequence[Any]
) -> dict[str, dict[str, float]]:
    """Relative L2 error and row cosine of every float output, compressed vs original, over ``batches``."""
    names = [o.name for o in original.get_outputs()]  # type: ignore[attr-defined]
    sums: dict[str, dict[str, float]] = {
        n: {"err": 0.0, "ref": 0.0, "cos_sum": 0.0, "cos_min": 1.0, "rows": 0} for n in names
    }
    for batch in batches:
        feed = complete_feed(batch, specs)
        ref_out = original.run(names, feed)  # type: ignore[attr-defined]
        new_out = compressed.run(names, feed)  # type: ignore[attr-defined]
        for name, ref, new in zip(names, ref_out, new_out, strict=True):
            if not np.issubdtype(np.asarray(ref).dtype, np.floating):
                continue
            ref64 = np.asarray(ref, dtype=np.float64)
            new64 = np.asarray(new, dtype=np.float64)
            acc = sums[name]
            acc["err"] += float(np.sum((new64 - ref64) ** 2))
            acc["ref"] += float(np.sum(ref64**2))
            a = ref64.reshape(-1, ref64.shape[-1]) if ref64.ndim else ref64.reshape(1, 1)
            b = new64.reshape(a.shape)
            denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            valid = denom > 0
            cos = np.sum(a * b, axis=1)[valid] / denom[valid]
            if cos.size:
                acc["cos_sum"] += float(cos.sum())
                acc["cos_min"] = min(acc["cos_min"], float(cos.min()))
                acc["rows"] += int(cos.size)
    result = {}
    for name, acc in sums.items():
        if acc["rows"] == 0 and acc["ref"] == 0:
            continue
        result[name] = {
            "relative_l2": (acc["err"] ** 0.5) / (acc["ref"] ** 0.5) if acc["ref"] > 0 else 0.0,
            "cosine_mean": acc["cos_sum"] / acc["rows"] if acc["rows"] else 1.0,
            "cosine_min": acc["cos_min"],
        }
    return result
