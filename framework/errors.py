"""The one exception type a user sees: a one-line message, exit code 2, no traceback."""

__all__ = ["LowbitError"]


class LowbitError(Exception):
    """A user-facing error: what was wrong, the value, what would be right.

    The CLI prints ``str(err)`` on one line and exits with code 2 (traceback only with
    ``--verbose``). Library code raises it for bad input; bugs stay ordinary exceptions.
    """
