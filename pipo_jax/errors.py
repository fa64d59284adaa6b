"""Every user-facing error class, in one light module (no JAX, no training imports).

A CLI turns any of the ``USER_ERRORS`` into one ``error: <message>`` line and exit status 2
(``pipo_jax.cli.run_main``); ``Preempted`` is not an error (a clean stop on a signal).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class CheckpointError(RuntimeError):
    """A missing, unusable or corrupt checkpoint; the message says what to do about it."""


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, missing prerequisite stage, config mismatch)."""


class PromptError(ValueError):
    """A prompt that cannot be decoded (empty, or longer than the model's context)."""


class ChatDataError(ConfigError):
    """Unusable chat training data (missing files, a malformed line, nothing left to train on);
    the message names the file and, for a line, its 1-based number."""


class BenchError(ConfigError):
    """A benchmark file or result file that cannot be used; the message names file and line."""


class MappingError(ConfigError):
    """A checkpoint whose keys, shapes or config do not fit the model; the message says which."""


class ConvertError(ConfigError):
    """An input folder, run directory or option that cannot be converted (a user error: the CLI
    prints it as one ``error:`` line and exits with 2)."""


class StorageError(OSError):
    """A write that the storage refused (disk full, read-only or not permitted, I/O error); the
    message names the path, the reason, the free space and what to do
    (``pipo_jax.io.diskerrors.write_error``). An ``OSError``, so code that handles failed writes
    still catches it."""


class Preempted(Exception):
    """Training stopped on a signal after saving its current step; run it again to resume.

    Not a ``CheckpointError`` or ``TrainingError``: nothing is wrong, and the exit status should
    tell a scheduler which signal ended the process (``exit_code``: 143 for SIGTERM, 130 for
    SIGINT, as a shell reports a process killed by that signal).
    """

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# What a CLI reports as one line and exit status 2 (the subclasses above included).
USER_ERRORS = (ConfigError, CheckpointError, TrainingError, PromptError, StorageError)
