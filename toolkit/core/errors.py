"""The one error type for mistakes in what the user gave (flags, files, folders).

The CLI catches :class:`UserError` in one place and prints its message on one
line with exit status 2 (the traceback only with ``-v``). Every message names
the flag or file, the value received, and what to do instead. It derives from
``ValueError`` so that library callers can keep catching that.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a flag, a file or a folder that cannot be used as given."""
