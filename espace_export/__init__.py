"""espace-export: compress transformer ONNX models with ESPACE activation projections.

>>> import espace_export
>>> result = espace_export.compress("model.onnx", ratio=0.5)   # doctest: +SKIP
>>> result.targeted_compression                                 # doctest: +SKIP
0.52
"""

__version__ = "0.1.0"

from espace_export.errors import EspaceError  # noqa: E402
from espace_export.pipeline import CompressionResult, compress  # noqa: E402

__all__ = ["CompressionResult", "EspaceError", "__version__", "compress"]
