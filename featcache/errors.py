"""The line between a user's mistake and a bug.

A `UserError` is something the user can fix: a wrong path, an unknown name, a file that cannot be used, a
setting out of range. Commands print its message as one paragraph and exit with code 2 (`--debug` shows the
traceback behind it). Every other exception is a bug in this project: commands print its traceback and say
so. Each error class of featcache and heads that means "the user asked for something impossible" derives from
UserError; ConfigError is also a ValueError, so code that validates with `except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An option or config value that is not valid (unknown name, out of range, contradictory)."""


class WeightsError(UserError):
    """Weights for a backbone cannot be found or used; the message says where we looked and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`) while a command runs, raised in the main thread like Ctrl-C's
    KeyboardInterrupt so that every `finally` and cleanup runs the same way; exit code 143 (128 + 15).

    A command that keeps work across an interruption sets `kept` (what is kept, one clause) and `again_flag`
    (the option that continues it, e.g. "--resume"; empty: rerun the same command) on the KeyboardInterrupt
    it lets through; cli.py prints them with the exact command to run."""

    exit_code = 143
