"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class HypercloneError(Exception):
    """Bad input or an impossible request; the message names the problem in one line."""
