"""One exception type for bad input (cli/guard.py turns it into one clear error line)."""
from __future__ import annotations


class DSparkError(Exception):
    """A user-facing error. The message names the problem and the fix."""

