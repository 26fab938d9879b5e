"""The one exception type users see: a message that names the problem and the fix."""


class KfError(Exception):
    """A problem with the user's input or files; the CLI prints it on one line, exits 2."""

    exit_code = 2
