"""The one exception type of the data stage, so callers can catch bad input without catching bugs."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or data config: the message names the file, line/row, field and the fix."""
