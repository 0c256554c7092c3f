"""The GitHub Actions recipe in docs/deployment.md runs, step by step, on a sample model (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._repo import ROOT


@pytest.mark.slow
def test_the_documented_actions_recipe_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the sample model is exported with torch (pip install 'espace-export[torch]')")
    pytest.importorskip("yaml", reason="the recipe is read with PyYAML (installed with transformers)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", str(ROOT / "docs" / "ci_recipe_check.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # every documented step ran, in order, and left what the next one and the upload need
    steps = [line for line in done.stdout.splitlines() if line.startswith("--- ")]
    names = [line.split(":")[0][4:] for line in steps]
    assert names[-5:] == ["compress", "profile", "gate", "actions/upload-artifact@v4", "the recipe ran"], steps
    assert (tmp_path / "build" / "model.espace.onnx").is_file()
    summary = (tmp_path / "step-summary.md").read_text()
    assert summary.startswith("### ESPACE latency gate") and "| gemm.ratio |" in summary
