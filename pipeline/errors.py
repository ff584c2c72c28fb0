"""Errors a user can cause and fix: the CLI prints their message as one line, no traceback.

Anything else escaping the pipeline is a bug in strata and keeps its traceback.
"""


class StrataError(Exception):
    """Base of every user-fixable error; the message names the thing and the fix."""


class ConfigError(StrataError):
    """The config file or an override is invalid."""


class InputError(StrataError):
    """The input location is missing, empty or unreadable."""


class ModelError(StrataError):
    """The model folder cannot be found or is not a supported encoder."""


class OutputError(StrataError):
    """The output location cannot be written, or holds a different run."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for an error message: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
