"""Session-wide pytest hooks.

The test process hosts a Ray driver (tests/integration) and torch's native thread pools. In one
full run, after every test had passed and pytest had printed its summary, the process then died in
the interpreter's teardown (SIGSEGV; the kernel log showed a non-main thread jumping to a heap
address), which made a green run exit non-zero. None of the project's code runs at that point, so
once pytest has reported, the process leaves with pytest's own exit status and skips the
interpreter's teardown. A failed test still exits non-zero.
"""

from __future__ import annotations

import os
import sys

import pytest

_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
