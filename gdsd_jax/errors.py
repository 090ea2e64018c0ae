"""The one base class of errors a user can fix by changing an input (a config value, a file, a flag).

The command line prints such an error as one line naming the problem (``gdsd-jax --debug`` or
``GDSD_JAX_DEBUG=1`` shows the traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message alone says what was wrong and what was expected."""


def error_line(command: str, message: object) -> str:
    """The one line every command reports an error with: ``gdsd-jax COMMAND: error: MESSAGE`` (line breaks in
    the message become spaces)."""
    return f"gdsd-jax {command}: error: {' '.join(str(message).splitlines())}"
