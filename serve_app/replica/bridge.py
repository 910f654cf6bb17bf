"""Blocking work in a thread, seen as an async iterator: how a streaming edit reaches Serve.

`iterate_in_thread` runs the blocking engine call in a worker thread and yields what it emits
(`PartialImage`s), then its result. When the consumer goes away (client disconnect -> Serve
cancels the handle call -> the generator is closed), `on_close` runs: the caller sets the flag
the step hook checks there, so the engine stops at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any


async def iterate_in_thread(
    work: Callable[[Callable[[Any], None]], Any], *, on_close: Callable[[], None]
) -> AsyncIterator[Any]:
    """Run blocking `work(emit)` in a thread; yield each emitted item, then its result.

    `on_close` runs however the iteration ends (finished, failed, or closed/cancelled by the
    consumer): it is where the caller tells the thread to stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(kind: str, value: Any) -> None:
        # After a cancellation the loop may be gone; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def target() -> None:
        try:
            result = work(lambda item: put("item", item))
        except BaseException as exc:
            put("error", exc)
        else:
            put("done", result)

    worker = loop.run_in_executor(None, target)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            yield value
            if kind == "done":
                break
        await worker
    finally:
        on_close()
