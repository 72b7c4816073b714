"""The package version, in one place (read by saves, the CLI and packaging)."""

__version__ = "0.2.0"
