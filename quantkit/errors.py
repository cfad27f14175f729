"""Errors that reach the user as one line and exit code 2."""


class QuantkitError(Exception):
    """Bad input or environment: the message names the problem and the fix."""

    exit_code = 2


class GateFailure(Exception):
    """At least one artifact failed its accuracy gate (exit code 1)."""

    exit_code = 1
