"""Progress reporting. Library code reports stages and notes through a ``Reporter`` and never
prints; the CLI plugs in its rich progress bars, the default stays silent."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class Reporter:
    """Progress and messages; the CLI plugs in rich, the library default stays silent."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def info(self, message: str) -> None:
        pass
