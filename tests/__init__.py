"""The test suite, one folder per package of espace_export (plus graph_passes and end_to_end).

Folders are packages so two of them may hold files of the same name, and the shared helpers import the same
way from any depth: ``from tests._cli import run_cli``.
"""
