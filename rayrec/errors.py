"""Errors that rayrec reports to users as one clear line (no traceback)."""


class RayrecError(Exception):
    """Base of every error that the CLI prints as a message instead of a traceback."""


class ConfigError(RayrecError):
    """A job or search-space file, or an override, is invalid."""


class DataError(RayrecError):
    """Input data is malformed, missing, or empty after filtering."""
