"""Errors that autoseg reports to the user as one clear line (CLI exit code 2)."""

from __future__ import annotations


class AutosegError(Exception):
    """Base class for problems caused by the user's input or set-up, not by a bug.

    The message is a single line that names the file (where there is one) and the problem.
    The CLI prints it as ``error: <message>`` and exits with code 2.
    """


class DatasetError(AutosegError):
    """The dataset folder, its ``dataset.json`` or one of its files is malformed."""


class PlansError(AutosegError):
    """``plans.json`` (or another WORK artifact) is missing, invalid or from another dataset."""


class CheckpointError(AutosegError):
    """A checkpoint is missing or does not match the plans."""
