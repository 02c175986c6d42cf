"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class MidtrainError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix."""

    exit_code = 2


class ConfigError(MidtrainError):
    """A run spec, mixture or other config file is invalid; the message names the key path."""


class DataError(MidtrainError):
    """A corpus, tokenizer or prepared dataset is missing or malformed; the message names the file."""


class CheckpointError(MidtrainError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file."""
