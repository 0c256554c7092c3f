"""Worker for tests/calibration/test_distributed.py: calibrate a sample model on this rank's share of the
batches and decompose this rank's share of the activations.

Run under torchrun; rank 0 writes the all-reduced statistics and projections to OUT.npz. Run without
torchrun it does the same in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from espace_export.calibration import distributed  # noqa: E402
from espace_export.calibration.statistics import StatisticsSettings, collect_statistics  # noqa: E402
from espace_export.runtime import ort_session  # noqa: E402
from espace_export.selection.candidates import principal_components  # noqa: E402
from graph_passes import find_targets  # noqa: E402
from samples.make_models import sample_inputs  # noqa: E402


def main(model_path: str, out_path: str, num_batches: int) -> None:
    rank, world = distributed.init(backend="gloo")
    model = onnx.load(model_path)
    targets = find_targets(model)
    batches = [sample_inputs("llama", 2, 16, seed=s) for s in range(num_batches)]
    stats = collect_statistics(
        ort_session, model, targets, distributed.shard(batches, rank, world), StatisticsSettings(precision="float64")
    )
    distributed.all_reduce_statistics(stats)
    names = sorted(stats)
    # the decompositions split over the ranks: each returns (the rank that computed it, P)
    projections = distributed.share_work(
        names, lambda name: (rank, principal_components(stats[name].C_X, 16)), cost=lambda name: stats[name].K ** 3
    )
    if distributed.is_main_rank():
        arrays = {}
        for index, name in enumerate(names):
            arrays[f"C{index}"] = stats[name].C_X
            arrays[f"N{index}"] = stats[name].C_X_normalized
            arrays[f"rows{index}"] = np.array([stats[name].rows, stats[name].rows_normalized])
            arrays[f"P{index}"] = projections[index][1]
        owners = np.array([owner for owner, _ in projections])
        np.savez(out_path, world=np.array(world), owners=owners, **arrays)
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
