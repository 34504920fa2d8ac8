"""The exception types for user mistakes and interruptions.

The CLI turns a UserError into a single red line and its exit code; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad option, incompatible models, a full disk."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(UserError):
    """Ctrl-C: one line saying what was kept and how to continue (exit code 130)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=130)
