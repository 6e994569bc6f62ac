"""The core's errors: one base class with a message for the user and a kind for the caller.

The worker decides what to do with an error by its ``kind`` (record the message and fail,
or treat it as an internal error), never by its class name. Torch-free.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.StrEnum):
    INVALID_CONFIG = "invalid_config"  # a setting that cannot work with this model or data
    BAD_DATASET = "bad_dataset"  # missing files, a bad format, too few images
    BAD_CHECKPOINT = "bad_checkpoint"  # weights that cannot be read safely or do not fit
    TRAINING_FAILED = "training_failed"  # a run that diverged or cannot go on


class BulwarkError(ValueError):
    """An error whose message the user can act on (it names the field or file to change)."""

    kind: ClassVar[ErrorKind] = ErrorKind.INVALID_CONFIG

    @property
    def user_message(self) -> str:
        return str(self)
