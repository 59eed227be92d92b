"""What every long-running background loop of the services needs.

A loop that survives its step's failures (``except Exception``) must still
stop when cancelled. Some client libraries turn a cancellation that lands in
their connect or close into a timeout error, or swallow it (redis-py does),
and a cancelled task whose cancellation was swallowed waits on its next
sleep for ever: a stopping service then never finishes its stop.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raises CancelledError when the current task was asked to stop, whatever its step made of it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
