"""The ``lens-laai`` command: ``fit``, ``eval``, ``compose``, ``analyze`` and ``report``."""

from lens_laai.cli.main import main

__all__ = ["main"]
