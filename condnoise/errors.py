"""The one error type users see: a clear, one-line, actionable message (exit code 2)."""


class UserError(Exception):
    """Bad input or environment. The message names the offending file / field / value.

    The CLI prints ``condnoise: error: <message>`` and exits with code 2, without a
    traceback. Raise it (never a bare ValueError from deep inside torch) wherever user
    input is validated.
    """

    exit_code = 2


class CondnoiseWarning(UserWarning):
    """Something the user should know that does not stop the command (a stale lock taken
    over, ...). The CLI prints ``condnoise: warning: <message>`` on one line."""
