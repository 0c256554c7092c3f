"""Optional packages, imported when first needed, with a one-line error naming the extra that installs them.

Core espace-export needs numpy, onnx, scipy, typer, rich and matplotlib. Everything that runs a model
comes from an extra, so a GPU install never drags in the CPU runtime (``onnxruntime`` and
``onnxruntime-gpu`` install the same ``onnxruntime`` module and cannot coexist):

- ``[cpu]``: ``onnxruntime``; ``[gpu]``: ``onnxruntime-gpu`` (CUDA and TensorRT execution providers);
- ``[tensorrt]``: ``tensorrt`` and ``polygraphy`` (TensorRT engines);
- ``[torch]``, ``[text]``: torch/transformers for sample exports, tokenizers, gradients and healing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from espace_export.errors import EspaceError

RUNTIME_EXTRAS = "pip install 'espace-export[cpu]' (or 'espace-export[gpu]' for CUDA/TensorRT, never both)"
# Both runtime packages own the onnxruntime module: removing one of two installed leaves it broken.
RUNTIME_REPAIR = (
    "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'espace-export[cpu]' (or '[gpu]', not both)"
)


def _package(extra: str) -> str:
    return f"espace-export[{extra}]"


def install_hint(extra: str) -> str:
    return f"pip install '{_package(extra)}'"


def require(
    module: str, *, extra: str, purpose: str, fix: str | None = None, reinstall: str | None = None
) -> ModuleType:
    """``import module``, or an :class:`EspaceError` saying ``<purpose> needs the <module> package`` and
    which extra installs it.

    Only the module itself being absent becomes the install hint. A module that is present but fails to
    import (a half-removed package, a missing shared library) is reported as such, with its reason, since
    installing the extra again is then not what fixes it. ``fix`` overrides the install hint, ``reinstall``
    the repair hint.
    """
    reinstall = reinstall or f"reinstall it: pip install --force-reinstall '{_package(extra)}'"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module or module.startswith(missing + "."):
            raise EspaceError(f"{purpose} needs the {module} package", fix or install_hint(extra)) from None
        raise EspaceError(
            f"{module} is installed but cannot be imported: it needs {missing!r}, which is missing",
            reinstall,
        ) from None
    except ImportError as exc:  # present but broken: a shared library, a partial uninstall
        reason = " ".join(str(exc).split())[:200]
        raise EspaceError(
            f"{module} is installed but cannot be imported ({reason})",
            reinstall,
        ) from None


def require_onnxruntime(purpose: str = "running the model") -> ModuleType:
    """``import onnxruntime`` from either runtime package; missing, the error names both extras.

    Uninstalling one of ``onnxruntime``/``onnxruntime-gpu`` while both are installed leaves an empty
    ``onnxruntime`` directory that imports as a namespace package: that is reported as broken too.
    """
    ort = require("onnxruntime", extra="cpu", purpose=purpose, fix=RUNTIME_EXTRAS, reinstall=RUNTIME_REPAIR)
    if not hasattr(ort, "InferenceSession"):
        raise EspaceError("the onnxruntime module is incomplete (a runtime package was half removed)", RUNTIME_REPAIR)
    return ort
