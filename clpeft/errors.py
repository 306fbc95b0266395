"""The one exception type for a user's mistake.

A :class:`UserError` is printed by the CLI as a single line (no traceback) and exits with
status 2. Raise it for anything the user can fix: a bad config value, a missing file, an
uninstalled optional package. The message names the problem and the fix. :class:`UserErrors`
carries several problems found at once (every mistake of a config): one line each.
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


class UserErrors(UserError):
    """Several mistakes found at once; the CLI prints each on its own line (exit code 2)."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        more = len(self.messages) - 1
        super().__init__(self.messages[0] + (f" (and {more} more problem{'s' * (more > 1)}, listed apart)" if more else ""))

    @classmethod
    def of(cls, errors: list[UserError]) -> UserError:
        """One error for all of ``errors`` (itself when there is one)."""
        messages = [m for e in errors for m in getattr(e, "messages", [str(e)])]
        return errors[0] if len(messages) == 1 else cls(messages)
