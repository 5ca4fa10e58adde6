"""Errors that rayrec reports to users as one clear line (no traceback)."""


class RayrecError(Exception):
    """Base of every error that the CLI prints as a message instead of a traceback."""


class ConfigError(RayrecError):
    """A job or search-space file, or an override, is invalid."""


class DataError(RayrecError):
    """Input data is malformed, missing, or empty after filtering."""


class ClusterError(RayrecError):
    """The cluster can never hold the job, or its workers could not be placed in time."""


class SubmitError(RayrecError):
    """A job cannot be submitted: unreachable address, missing file or secret, bad options."""
