"""The one base class for errors that are the user's to fix (bad input, bad files, bad settings).

The CLI prints a :class:`DGQError` as one ``error: ...`` line and exits with 2; any other exception is a bug in dgq
and must surface as one, with its traceback, rather than be dressed up as a usage error.
"""


class DGQError(Exception):
    """A failure caused by the user's input, files, settings or machine, with a message that says what to fix."""
