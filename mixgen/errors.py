"""Errors a user can act on. The CLI prints them as one line; anything else is a bug."""

from __future__ import annotations


class MixgenError(Exception):
    """A refusal the user can fix: the command line is fine but SRC, OUT, a file an option names,
    the disk or the environment is not (exit code 1)."""

    exit_code = 1


class UsageError(MixgenError):
    """The command line is wrong by itself, whatever the files hold: an invalid option value or
    combination (exit code 2, like an unknown option or a missing argument)."""

    exit_code = 2


class DecodeError(MixgenError):
    """One source image could not be read; the pipeline skips it unless --strict."""
