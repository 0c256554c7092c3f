"""Pure ONNX graph passes: ONNX in, ONNX out (no onnxruntime, no TensorRT, no torch).

- :mod:`graph_passes.find` matches the weight GEMMs ESPACE can compress.
- :mod:`graph_passes.project` rewrites them into projected pairs ``(X·P)·(PᵀW)``.
"""

from graph_passes.find import (
    GemmTarget,
    ProjectedPair,
    find_projected_pairs,
    find_targets,
    group_by_activation,
    weight_matrix,
)
from graph_passes.project import Projection, project

__all__ = [
    "GemmTarget",
    "ProjectedPair",
    "Projection",
    "find_projected_pairs",
    "find_targets",
    "group_by_activation",
    "project",
    "weight_matrix",
]
