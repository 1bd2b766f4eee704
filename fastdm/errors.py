"""User-facing errors.

`FastDMError` is raised for anything the *user* can fix (bad input, bad flags, missing model
folder). The CLI prints its message as one line and exits 2; anything else is an internal
error (exit 1).
"""


class FastDMError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""
