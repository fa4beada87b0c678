"""User-facing errors. The CLI prints them as one line and exits with code 2 (never a traceback)."""

from __future__ import annotations


class GvpoError(Exception):
    """An error the user can fix (bad input, bad option, mismatched cache). Printed as one line."""


# The DataError message for JSON nested beyond what Python's parser can read (its recursion limit).
TOO_DEEP = "nested too deeply to read (a JSON value nested more than about a thousand levels)"


class DataError(GvpoError):
    """Bad input data, located precisely: file, then JSONL line (1-based) or table row (0-based), then field.

    str(err) -> "data.jsonl: line 3: field 'rewards': expected a finite number, got 'abc'"
    """

    def __init__(
        self,
        file: str,
        message: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ):
        self.file, self.message, self.line, self.row, self.field = file, message, line, row, field
        parts = [str(file)]
        if line is not None:
            parts.append(f"line {line}")
        elif row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(": ".join(parts))
