"""The one tracked task set: background tasks kept referenced until they finish, their failures
logged (and counted) instead of lost, and a way to wait for (:meth:`TaskSet.join`, which never
cancels) or cancel (:meth:`TaskSet.cancel`, bounded if asked) all of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

__all__ = ["TaskSet"]


class TaskSet:
    """Tasks started with :meth:`spawn`; see the module docs.

    Args:
        logger: where a failed task is logged (with its traceback) as ``"<what> task failed"``.
        what: names the owner in that line.
        on_error: called with the exception of each failed task (e.g. to count it).
    """

    __slots__ = ("_logger", "_on_error", "_tasks", "what")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._logger = logger
        self.what = what
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this set."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(exc)
        self._logger.error("%s task %s failed", self.what, task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(tuple(self._tasks))

    async def join(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the tasks running now, and any they start, have finished.

        Returns ``True`` once none runs (at once if none does), ``False`` if some still run
        after ``timeout`` seconds (``None``: no limit). Waiting never cancels a task: neither
        the timeout nor a cancellation of the caller does.
        """
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    await asyncio.wait(tuple(self._tasks))
        except TimeoutError:
            return False
        return True

    async def cancel(self, grace: float | None = None) -> int:
        """Cancel every task and wait for them to end.

        Args:
            grace: the longest wait, in seconds (``None``: no limit). Tasks still running then
                (they ignored the cancellation) are left running, logged as ``"<n> <what> tasks
                ignored cancellation"`` and counted in the result.

        Returns:
            How many tasks were still running after ``grace`` (0 without a limit).
        """
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return 0
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        if stuck:
            self._logger.error("%d %s tasks ignored cancellation", len(stuck), self.what)
        return len(stuck)
