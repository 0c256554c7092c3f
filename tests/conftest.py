"""Shared fixtures: sample transformers exported once per test session (never downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``sample_model(arch, exporter, **sizes)`` → path of a tiny random-init transformer exported to ONNX.

    Cached for the session: each (arch, exporter, sizes) is exported once.
    """
    pytest.importorskip("torch", reason="sample models are exported with torch (pip install 'espace-export[torch]')")
    pytest.importorskip("transformers", reason="sample models need transformers")
    from samples.make_models import export_sample

    directory = tmp_path_factory.mktemp("samples")
    cache: dict[tuple, Path] = {}

    def get(arch: str = "llama", exporter: str = "torchscript", **sizes: int) -> Path:
        key = (arch, exporter, tuple(sorted(sizes.items())))
        if key not in cache:
            cache[key] = export_sample(arch, exporter, directory / f"{arch}-{exporter}-{len(cache)}.onnx", **sizes)
        return cache[key]

    return get
