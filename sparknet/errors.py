"""User-facing errors: one line, naming the file, field and fix; exit code 2.

Anything a user can cause (a bad YAML key, a missing file, a source too small for its share) raises
`SparknetError`. Entry points wrap their `main` in `cli_main`, which prints the message on one line
and exits with status 2 instead of a traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sparknet's errors: a mistake on the command line is one line naming the argument and the fix
    (exit 2 through `cli_main`), not a usage block. `--help` prints the usage as usual."""

    def error(self, message: str):
        if "(fix:" in message:  # a type's own message (`at_least`) already says the fix
            raise SparknetError(f"{self.prog}: {message}")
        fix = f"see {self.prog} --help"
        if "unrecognized arguments" in message:
            fix = f"drop them, or see {self.prog} --help for the flags"
            if any(a.dest == "overrides" for a in self._actions):
                fix += "; config keys go as key.sub=value"
        elif "expected one argument" in message:
            fix = f"give it a value, e.g. {message.split()[1].rstrip(':')}=VALUE" if message.startswith("argument") \
                else fix
        elif "invalid int value" in message or "invalid float value" in message:
            fix = f"give a number, e.g. {message.split()[1].rstrip(':')}=2"
        elif "invalid choice" in message:
            fix = "use one of the choices listed"
        raise SparknetError(f"{self.prog}: {message} (fix: {fix})")


def at_least(minimum: int, example: int):
    """An argparse `type`: a whole number >= `minimum`; else a message naming the fix (`--workers 0` -> "must be a
    whole number >= 1, got '0' (fix: e.g. 1)")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r} (fix: e.g. {example})")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


class RunFailed(SparknetError):
    """A run that stopped on its own (a diverged loss): not bad input, so exit code 3."""

    exit_code = 3
