"""espace-export: compress transformer ONNX models with ESPACE activation projections.

One call, or one call per stage:

>>> import espace_export
>>> result = espace_export.compress("model.onnx", ratio=0.5)                 # doctest: +SKIP
>>> calibration = espace_export.calibrate("model.onnx", calib_text="builtin:pydoc", tokenizer="tok/")  # doctest: +SKIP
>>> plan = espace_export.plan("model.onnx", calibration, ratio=0.5)          # doctest: +SKIP
>>> result = espace_export.apply("model.onnx", plan, output="model.espace.onnx")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from espace_export.errors import EspaceError  # noqa: E402
from espace_export.io.artifacts import Calibration, Plan  # noqa: E402
from espace_export.options import (  # noqa: E402
    CompressOptions,
    DataOptions,
    OutputOptions,
    RankOptions,
    SelectionOptions,
)
from espace_export.pipeline import CompressionResult, Run, apply, calibrate, compress, plan  # noqa: E402

__all__ = [
    "Calibration",
    "CompressOptions",
    "CompressionResult",
    "DataOptions",
    "EspaceError",
    "OutputOptions",
    "Plan",
    "RankOptions",
    "Run",
    "SelectionOptions",
    "__version__",
    "apply",
    "calibrate",
    "compress",
    "plan",
]
