"""Errors a user can act on. The CLI prints them as one line; anything else is a bug."""

from __future__ import annotations


class MixgenError(Exception):
    """A failure the user can fix (bad input, bad environment); exit code 1."""

    exit_code = 1


class UsageError(MixgenError):
    """An invalid option value or combination; exit code 2 like any other usage error."""

    exit_code = 2


class DecodeError(MixgenError):
    """One source image could not be read; the pipeline skips it unless --strict."""
