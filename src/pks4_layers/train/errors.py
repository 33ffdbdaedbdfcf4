"""Errors that are the user's mistake, not the program's: ``pks4-train`` prints them as one line.

A :class:`UsageError` says what was asked for, what was expected and what was found:
``"<what>: expected <x>, got <y>"``. ``pks4-train`` catches it once, in ``main()``, prints
``pks4-train: error: <message>`` on stderr and exits with status 2 (``--debug`` shows the
traceback instead). Every other exception is a bug and keeps its traceback (exit status 1).

The classes subclass the built-in errors the same checks raised before (``ValueError``,
``TypeError``, ``FileNotFoundError``), so Python callers that catch those keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Optional

__all__ = [
    "MissingPathError",
    "UsageError",
    "UsageTypeError",
    "closest",
    "did_you_mean",
    "first_sentence",
    "one_line",
]


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(text).split())


def first_sentence(text: str) -> str:
    """The first sentence of ``text``'s first non-empty line: the reason of a library's error
    without the advice that follows it."""
    line = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    head, sep, _ = line.partition(". ")
    return head + "." if sep else line


class UsageError(ValueError):
    """A value, file or flag the user gave that cannot work.

    Args:
        what: the name of the thing (a config key, a flag, a file and line).
        expected: what would have worked.
        got: what was there instead.
    """

    def __init__(
        self, what: str, expected: str, got: str, *, message: Optional[str] = None
    ) -> None:
        self.what, self.expected, self.got = what, expected, got
        text = message if message is not None else f"{what}: expected {expected}, got {got}"
        super().__init__(one_line(text))

    @classmethod
    def from_error(cls, err: BaseException) -> UsageError:
        """``err``'s message as a :class:`UsageError` (the library's errors already read
        ``"<what>: expected <x>, got <y>"``); for a message in another form ``what`` holds
        all of it and ``expected`` / ``got`` are empty. Raise it ``from err``."""
        message = one_line(str(err))
        head, sep, rest = message.partition(": expected ")
        expected, sep2, got = rest.rpartition(", got ")
        if sep and sep2:
            return cls(head, expected, got)
        return cls(message, "", "", message=message)

    def __reduce__(self) -> tuple:
        # args holds the one formatted message, not the three parts: rebuild from all four, so
        # the error survives pickling (multiprocessing, DataLoader workers).
        return (_rebuild, (type(self), self.what, self.expected, self.got, str(self)))


def _rebuild(cls: type, what: str, expected: str, got: str, message: str) -> UsageError:
    return cls(what, expected, got, message=message)


class UsageTypeError(UsageError, TypeError):
    """A value of the wrong type (a string where a number goes): also a ``TypeError``."""


class MissingPathError(UsageError, FileNotFoundError):
    """A file or folder the user named that is not there: also a ``FileNotFoundError``."""


def closest(word: str, choices: Iterable[str]) -> Optional[str]:
    """The choice most like ``word`` (``difflib``), or ``None`` when none is close."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return match[0] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word``, or ``""``."""
    match = closest(word, choices)
    return f" (did you mean {match!r}?)" if match else ""
