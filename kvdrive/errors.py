"""User-facing errors.

A ``KvdriveError`` is a mistake the user can fix (bad path, bad option, input too
long). The CLI prints its message on one line, without a traceback, and exits 2.
Messages name the fix. Anything else that escapes is a bug and keeps its traceback.
"""


class KvdriveError(Exception):
    """An error caused by user input; the message says what to change."""


class CapacityError(KvdriveError):
    """Every tier that could hold the data is full."""
