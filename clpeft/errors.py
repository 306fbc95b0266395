"""The one exception type for a user's mistake.

A :class:`UserError` is printed by the CLI as a single line (no traceback) and exits with
status 2. Raise it for anything the user can fix: a bad config value, a missing file, an
uninstalled optional package. The message names the problem and the fix.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class RunError(UserError):
    """A run that had to stop (diverged loss, out of memory): one line, exit code 1.

    Checkpoints of completed experiences are kept; ``--resume`` continues from them.
    """

    exit_code = 1
