"""The one error type the CLI turns into a clean one-line message (exit code 2, no traceback)."""


class InputError(Exception):
    """Bad user input: the message names the file (or config key) and the problem."""
