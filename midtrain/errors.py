"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

import errno
from pathlib import Path


class MidtrainError(Exception):
    """An error caused by the user's input or environment, with a message that says what to fix."""

    exit_code = 2


class ConfigError(MidtrainError):
    """A run spec, mixture or other config file is invalid; the message names the key path."""


class DataError(MidtrainError):
    """A corpus, tokenizer or prepared dataset is missing or malformed; the message names the file."""


class CheckpointError(MidtrainError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the file."""


def checkpoint_write_error(path: Path, exc: OSError) -> CheckpointError:
    """A failed checkpoint write, saying plainly when the disk (or a limit) is full."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return CheckpointError(
            f"{path}: out of disk space or over the file size limit ({exc.strerror}); "
            "free space and save again"
        )
    return CheckpointError(f"{path}: cannot write ({exc.strerror or exc})")
