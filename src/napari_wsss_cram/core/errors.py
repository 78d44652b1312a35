"""User-facing errors. Their message is shown as-is by the CLI and the napari docks (no traceback)."""

from __future__ import annotations


class WsssCramError(Exception):
    """Base class: the message says what went wrong and what to do, naming the file involved."""


class ImageReadError(WsssCramError):
    """An image is missing, truncated, of an unsupported format or of an unusable pixel type."""


class DatasetError(WsssCramError):
    """A training or evaluation folder is malformed (bad names, empty, missing masks...)."""


class CheckpointError(WsssCramError):
    """A checkpoint is missing, corrupt, unsafe (needs pickle) or does not match the request."""


class OutputExistsError(WsssCramError):
    """An output file exists and ``overwrite`` was not requested."""


class OutOfMemoryError(WsssCramError):
    """The device ran out of memory; the message says which setting to lower."""


class DependencyError(WsssCramError):
    """An optional dependency is missing; the message gives the install command."""


class TrainingError(WsssCramError):
    """Training cannot go on (the loss diverged, the disk is full); the last checkpoint is kept."""
