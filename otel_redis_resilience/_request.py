"""The context manager :meth:`Resilience.request` returns: one request scope, opened and closed."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._scope import RequestScope, enter, leave

if TYPE_CHECKING:
    from ._resilience import Resilience

H = TypeVar("H")


class RequestContext(Generic[H]):
    """The context manager returned by :meth:`Resilience.request`."""

    __slots__ = ("_deadline", "_res", "_scope")

    def __init__(self, res: Resilience, deadline: float | None) -> None:
        self._res = res
        self._deadline = deadline
        self._scope: RequestScope | None = None

    def _open(self) -> Any:
        if self._scope is not None:
            raise RuntimeError("this request scope is already open; call res.request() again")
        deadline = self._deadline
        scope = RequestScope(None if deadline is None else time.monotonic() + deadline)
        scope.handle = self._res.handle(scope)
        self._scope = scope
        wb = self._res._core.write_behind
        if wb is not None and wb.needs_start:
            wb.kick()
        enter(scope)
        return scope.handle

    def _close(self) -> None:
        scope = self._scope
        if scope is None:
            return
        leave(scope)

    @property
    def scope(self) -> RequestScope | None:
        """The scope's state (counters, deadline) once opened."""
        return self._scope

    def __enter__(self) -> Any:
        self._res._driver.check_with(asynchronous=False)
        return self._open()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    async def __aenter__(self) -> Any:
        self._res._driver.check_with(asynchronous=True)
        return self._open()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()
