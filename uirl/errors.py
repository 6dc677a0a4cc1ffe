"""Project exceptions. Every message renders on one line and names where the problem is."""

from __future__ import annotations

from typing import Any

_MAX_VALUE_CHARS = 80


def _show(value: Any) -> str:
    """repr() of a bad value, cut short so one huge cell cannot flood the message."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python turns into text
        text = f"<{type(value).__name__} too large to show>"
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _render(message: str, *, file: str | None, row: int | None, field: str | None,
            value: Any, has_value: bool, line: int | None = None) -> str:
    where = str(file) if file is not None else ""
    if line is not None:
        where = f"{where} line {line}".strip()
    elif row is not None:
        where = f"{where} row {row}".strip()
    if field is not None:
        where = f"{where}, field {field!r}" if where else f"field {field!r}"
    if has_value:
        where = f"{where} = {_show(value)}" if where else f"value {_show(value)}"
    message = " ".join(str(message).split())  # one line, whatever the message contains
    text = f"{where}: {message}" if where else message
    return text.replace("\r", " ").replace("\n", " ")  # a file name or field with a line break


class UirlError(Exception):
    """Base class of every error raised on purpose by uirl."""


class DataError(UirlError):
    """Bad input data, e.g. ``events.jsonl row 12, field 'timestamp' = 'abc': expected an integer timestamp``.

    ``row`` is the 0-based data row (header and file lines not counted); ``line`` the 1-based line
    of a text file as an editor shows it (named instead of ``row`` when given). ``value=None`` means
    "no value to show"; pass the string ``'None'`` if that is really the offending value.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, value: Any = None, line: int | None = None) -> None:
        self.message, self.file, self.row, self.field, self.value = message, file, row, field, value
        self.line = line
        super().__init__(_render(message, file=file, row=row, field=field, value=value,
                                 has_value=value is not None, line=line))


class ConfigError(UirlError):
    """Bad configuration, e.g. ``field 'lr' = -1.0: expected a number > 0``."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        self.message, self.field, self.value = message, field, value
        super().__init__(_render(message, file=None, row=None, field=field, value=value,
                                 has_value=value is not None))


class RunFailed(UirlError):
    """A federated run that cannot vouch for its model: a round with too few valid updates, or a
    model that is no longer finite. Raised by the ServerApp so that Flower reports the run as failed
    and no final adapter is written."""


class EvaluationWithheld(UirlError):
    """The silo evaluated fewer users than ``eval-min-users`` and reports no metrics."""
