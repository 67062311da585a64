"""What the command-line tools share: user errors are one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``PROG: error: ...; see PROG --help``), exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        fail(f"{self.prog}: error: {message} (see {self.prog} --help)")


def fail(message: str, status: int = 2):
    """Print ``message`` as one line on stderr and exit with ``status``."""
    print(" ".join(str(message).split("\n")), file=sys.stderr)
    raise SystemExit(status)
