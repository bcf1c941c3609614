"""Whether the caller of a request is still there, so that long work it asked for can be withdrawn.

The front ends watch the callers of long requests (explanations): the HTTP body middleware sees
the connection's ``http.disconnect``, the gRPC handler registers a callback for the end of the
call. Each makes a :class:`CallerWatch` current (a context variable, which BentoML's worker threads
inherit) for the time the request runs; the work asks :func:`current_caller` for it and registers
what to do when the caller leaves (:meth:`CallerWatch.on_leave`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

logger = logging.getLogger(__name__)


class CallerWatch:
    """One request's caller: :meth:`leave` runs, once, every callback registered until then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._gone = False

    @property
    def gone(self) -> bool:
        return self._gone

    def on_leave(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the caller leaves (now, if it has); returns a function that
        unregisters it, to call once the work is done."""
        with self._lock:
            if not self._gone:
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def leave(self) -> None:
        """The caller went away (its connection closed, its call was cancelled)."""
        with self._lock:
            if self._gone:
                return
            self._gone = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing callback must not keep the others from running.
                logger.exception("a callback for a departed caller failed")


_CALLER: ContextVar[CallerWatch | None] = ContextVar("cnnkit_caller", default=None)


def current_caller() -> CallerWatch | None:
    """The watch of the request being served here, if its front end watches it."""
    return _CALLER.get()


@contextlib.contextmanager
def watching(caller: CallerWatch) -> Iterator[CallerWatch]:
    """Make ``caller`` current for the code (and the threads it starts with a copied context) inside."""
    token = _CALLER.set(caller)
    try:
        yield caller
    finally:
        _CALLER.reset(token)


__all__ = ["CallerWatch", "current_caller", "watching"]
