"""User-facing errors.

Every mistake a user can make (a bad override, a missing file, a corrupt checkpoint) raises a
subclass of `CrammingError` whose message says what went wrong and what to do about it. The CLI
prints that message without a traceback and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class CrammingError(Exception):
    """An error caused by input the user can fix; the message is shown as-is."""


class ConfigError(CrammingError):
    """A configuration value or key is invalid."""


class DataError(CrammingError):
    """Input data or a prepared dataset is missing, empty, unreadable or corrupt."""


class CheckpointError(CrammingError):
    """A checkpoint or exported model folder is missing, incomplete, corrupt or mismatched."""
