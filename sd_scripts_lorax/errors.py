"""The one error type users see.

Every problem with user input (paths, files, shapes, families, arguments) is raised as
`LoraxInputError` with a one-line message naming the file, the module and the shapes involved.
Entry points catch it, print `error: <message>` to stderr and exit with code 2.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

EXIT_BAD_INPUT = 2


class LoraxInputError(Exception):
    """Bad input: a one-line, user-facing message."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text (its type name when empty), cut to `limit` characters:
    library errors quoted inside our one-line messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn LoraxInputError into one line on stderr and exit code 2; warnings meanwhile are one
    `warning:` line each (not Python's two, the second being the source line that warned)."""
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = one_line
    try:
        yield
    except LoraxInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    finally:
        warnings.showwarning = shown
