"""The one error type of checkpoint loading."""

from __future__ import annotations


class WeightsError(ValueError):
    """A checkpoint directory or file is missing, unreadable or inconsistent.

    The message always names the file (or directory) and what is wrong with it.
    """
