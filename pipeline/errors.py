"""Errors a user can cause and fix: the CLI prints their message as one line, no traceback.

Anything else escaping the pipeline is a bug in strata and keeps its traceback.
"""

import re


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM): unwinds like Ctrl-C, so the lease is given back."""


_STOPS: list[type[BaseException]] = []  # stops asked for by a signal in this process, oldest first


def stop(kind: type[BaseException]) -> None:
    """A signal handler's body: remember the stop, then raise it (KeyboardInterrupt, Terminated).
    A library that swallows the exception where it lands (seen once: a Ctrl-C during a run that
    then ran to its end) does not swallow the stop: the run loop asks `raise_if_stopped`."""
    _STOPS.append(kind)
    raise kind()


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for, if any (called between a run's fragments)."""
    if _STOPS:
        raise _STOPS[0]()


def clear_stops() -> None:
    """Forget earlier stops (a CLI command starting in a process that ran one before: tests)."""
    _STOPS.clear()


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
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    # Ray ends some first lines with the start of a chained traceback: "...: Traceback (most recent call last):"
    first = lines[0].split("Traceback (most recent call last)")[0].rstrip(" :") if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def escaped(text: str) -> str:
    """Text for a one-line message with its unprintable characters escaped (`\\x1b`, `\\n`): causes
    often echo a file's bytes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and the chain of causes it wraps, outermost first (Ray's task errors keep the
    worker's exception in `cause`; Python's own chain is `__cause__`); a cycle ends the chain."""
    chain, seen = [exc], {id(exc)}
    while True:
        inner = getattr(chain[-1], "cause", None) or chain[-1].__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return chain
        seen.add(id(inner))
        chain.append(inner)


def root_cause(exc: BaseException) -> str:
    """The exception that started it all, as one line: a user error's own message, or the
    innermost cause of a chain of wrappers (Ray's task errors wrap the worker's exception)."""
    exc = causes(exc)[-1]
    return str(exc) if isinstance(exc, StrataError) else one_line(exc)


def described(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and first line, and the next line when the first only
    announces it ("Validation error for field 'x':")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = escaped(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
