"""Errors a user can cause and fix: the CLI prints their message as one line, no traceback.

Anything else escaping the pipeline is a bug in strata and keeps its traceback.
"""

import re


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM): unwinds like Ctrl-C, so the lease is given back."""


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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """An exception as one line for an error message: its type and the first line of its text
    (terminal colour codes removed: Ray colours the names of its workers)."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def escaped(text: str) -> str:
    """Text for a one-line message with its unprintable characters escaped (`\\x1b`, `\\n`): causes
    often echo a file's bytes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def root_cause(exc: BaseException) -> str:
    """The exception that started it all, as one line: a user error's own message, or the
    innermost cause of a chain of wrappers (Ray's task errors wrap the worker's exception)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return str(exc) if isinstance(exc, StrataError) else one_line(exc)
