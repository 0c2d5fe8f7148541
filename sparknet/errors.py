"""User-facing errors: one line, naming the file, field and fix; exit code 2.

Anything a user can cause (a bad YAML key, a missing file, a source too small for its share) raises
`SparknetError`. Entry points wrap their `main` in `cli_main`, which prints the message on one line
and exits with status 2 instead of a traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class SparknetError(Exception):
    """An error caused by the user's input; the message is the whole explanation."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        # Collapse to one line: messages built from file contents may carry newlines.
        super().__init__(" ".join(str(message).split()))


def cli_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point so user errors print `error: ...` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except SparknetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except BrokenPipeError:  # `... | head`: the reader left; not an error
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            print("interrupted: everything written so far is intact; rerun to resume", file=sys.stderr)
            return 130

    return wrapper


class RunFailed(SparknetError):
    """A run that stopped on its own (a diverged loss): not bad input, so exit code 3."""

    exit_code = 3
