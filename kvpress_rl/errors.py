"""The one error type users see: a one-line message naming what was wrong and what is accepted."""


class KvrlError(ValueError):
    """Bad input from a user (a file, an option, a model). The CLI prints it as one line and exits 2."""
