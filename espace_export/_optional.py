"""The one guard for optional packages: import lazily, or fail in one line naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from espace_export.errors import EspaceError

_NAMES = {"torch": "PyTorch", "tensorrt": "TensorRT", "onnxruntime": "ONNX Runtime", "transformers": "transformers"}


def install_hint(extra: str) -> str:
    return f"pip install 'espace-export[{extra}]'"


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``import module`` (dotted names too), or an :class:`EspaceError`: "<purpose> needs <package>, which is
    not installed — pip install 'espace-export[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _NAMES.get(module.split(".")[0], module.split(".")[0])
        raise EspaceError(f"{purpose} needs {package}, which is not installed", install_hint(extra)) from None
