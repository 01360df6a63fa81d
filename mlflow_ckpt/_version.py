"""The package version (kept in one place; pyproject.toml mirrors it)."""

__version__ = "0.1.0"
