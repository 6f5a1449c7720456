"""Progress bars for long loops (tqdm), the only output the library writes itself.

Bars show on a terminal and stay silent elsewhere, unless ``MECHTHINK_PROGRESS`` says otherwise
(``1``: always, ``0``: never) or :func:`set_enabled` was called (the CLI turns them on).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

__all__ = ["set_enabled", "track"]

T = TypeVar("T")
_ENABLED: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """``True``: always show bars; ``False``: never; ``None``: only on a terminal."""
    global _ENABLED
    _ENABLED = flag


def _disable() -> bool | None:
    env = os.environ.get("MECHTHINK_PROGRESS")
    if env in ("0", "1"):
        return env == "0"
    return None if _ENABLED is None else not _ENABLED


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar labelled ``desc``."""
    from tqdm.auto import tqdm

    if total is None and isinstance(items, Sized):
        total = len(items)
    yield from tqdm(items, desc=desc, total=total, disable=_disable(), leave=False, dynamic_ncols=True)
