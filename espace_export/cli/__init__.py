"""The ``espace-export`` command line."""

from espace_export.cli.main import app, main

__all__ = ["app", "main"]
