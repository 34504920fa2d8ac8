"""The one exception type for user mistakes.

The CLI turns a UserError into a single red line and its exit code; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad option, incompatible models."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
