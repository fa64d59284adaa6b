"""Two orbax behaviours that bury one error under pages of stderr, and what we do about them.

1. **Event loops closed under running reads and writes.** Orbax runs each batch of tensorstore
   operations with ``asyncio.gather`` in a fresh event loop
   (``asyncio_utils._run_sync_via_new_loop``) and closes that loop as soon as the gather ends.
   When one operation fails (a corrupt array on restore, a full disk on save), ``gather`` raises
   at once while its sibling operations are still running in tensorstore's threads; each of them
   later finds the loop closed and prints ``RuntimeError: Event loop is closed`` with a
   traceback (and unfinished write coroutines print more at interpreter exit). ``install``
   makes a failed main coroutine wait for its sibling tasks before it raises, so that the loop
   is closed only once they are done.
2. **Errors logged with their tracebacks before they are raised.** Orbax's background save
   threads log a failure with ``logging.exception`` at every level it passes, then raise it.
   A storage fault (disk full, read-only) is reported by ``pipo_jax.io.checkpoint`` as one
   ``StorageError`` line, so those log records are dropped; every other error is logged as
   before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from orbax.checkpoint._src import asyncio_utils

from pipo_jax.io.diskerrors import storage_errno

# How long a failed batch waits for its sibling operations: each is one file read or write.
_SIBLING_WAIT_SECONDS = 60.0


async def _wait_for_sibling_tasks() -> None:
    current = asyncio.current_task()
    siblings = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if not siblings:
        return
    done, _ = await asyncio.wait(siblings, timeout=_SIBLING_WAIT_SECONDS)
    for task in done:  # their errors are the one being raised, or its echoes: not news
        if not task.cancelled():
            task.exception()


def _finishing_siblings(run: Callable[[Coroutine[Any, Any, Any]], Any]
                        ) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run_sync_via_new_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        async def main() -> Any:
            try:
                return await coro
            except Exception:  # a batch that succeeded has no operation left in flight
                await _wait_for_sibling_tasks()
                raise

        return run(main())

    run_sync_via_new_loop.pipo_finishes_siblings = True  # type: ignore[attr-defined]
    return run_sync_via_new_loop


class _DropReportedStorageErrors(logging.Filter):
    """Drops orbax's log records of a storage fault, which its caller reports as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("orbax" in record.pathname and exc is not None
                    and storage_errno(exc) is not None)


_FILTER = _DropReportedStorageErrors()


def install() -> None:
    """Applies both remedies (idempotent). Called when ``pipo_jax.io.checkpoint`` is imported.

    An orbax without ``_run_sync_via_new_loop`` keeps its own loop handling (only the stray
    tracebacks come back; ``tests/test_checkpoint.py`` notices).
    """
    run = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if run is not None and not getattr(run, "pipo_finishes_siblings", False):
        asyncio_utils._run_sync_via_new_loop = _finishing_siblings(run)
    logging.getLogger("absl").addFilter(_FILTER)  # orbax logs through absl's logger
