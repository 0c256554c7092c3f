"""The repository root, for tests that read or run its files (pyproject, docs, examples), from any folder."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
