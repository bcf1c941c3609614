"""Exceptions raised by the training toolkit.

Every error that a user can cause or fix (a missing data root, an unknown recipe, a bad override)
derives from ``CnnkitError`` and carries a message that says what is wrong and what to do; the
command line prints that message and exits with status 2 instead of showing a traceback.
"""


class CnnkitError(Exception):
    """Base class of the errors a user can fix."""


class DataError(CnnkitError, ValueError):
    """A data set is missing, malformed or cannot be downloaded."""


class ConfigError(CnnkitError, ValueError):
    """A recipe, a configuration file or a command-line override is invalid."""


class ModelError(CnnkitError, ValueError):
    """A model cannot be built (unknown name, unreachable weights, bad arguments)."""


class RunError(CnnkitError, ValueError):
    """A run directory is missing, incomplete or cannot be resumed."""
