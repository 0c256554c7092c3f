"""``python -m espace_export`` is the ``espace-export`` command."""

from espace_export.cli import main

main()
