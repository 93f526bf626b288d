"""Errors a user can act on. The CLI prints them as one line; anything else is a bug."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? followed by a space (so "torch.load" or "v1.2" do not end one).
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


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


def one_line(text: object, limit: int = 160) -> str:
    """The first non-blank line of ``text`` (an exception's message, say) fit to quote inside a
    one-line error: whole when it fits in ``limit`` characters, else its first sentence when that
    fits, else cut at the last word boundary with an ellipsis. Never cut mid-word (only a single
    word longer than ``limit``, a long path say, is cut inside it)."""
    lines = [" ".join(line.split()) for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    if len(first) <= limit:
        return first
    end = _SENTENCE_END.search(first)
    if end is not None and end.end() <= limit:
        return first[: end.end()]
    head = first[:limit]  # limit - 1 characters and the ellipsis, the cut at a space
    cut = head.rfind(" ")
    head = head[:cut] if cut > 0 else head[: limit - 1]
    return head.rstrip(" ,;:([{'\"`-") + "\u2026"


def exc_line(exc: BaseException, limit: int = 160) -> str:
    """An exception quoted in a one-line error: its message's ``one_line``, or its type's name
    when it has none."""
    return one_line(exc, limit) or type(exc).__name__
