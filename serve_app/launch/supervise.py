"""`serve run` as a child the launcher owns: its own session, stopped as a whole.

`serve run` with no cluster to join starts a local Ray (GCS, raylet, dashboard, agents, workers)
as its own descendants. Each of them is in the POSIX session the child starts, so that session
is the exact set of processes to stop, and nothing else on the machine is touched (never
`ray stop`, which stops every Ray of this user). The session is also what keeps terminal and
process-group signals (Ctrl-C, `kill -- -PGID`, `make`'s group) away from Ray: only the
launcher decides how Serve stops, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import psutil

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # A launcher started in the background by a script inherits SIGINT ignored; serve run must
    # not, or it would ignore the SIGINT that asks it to shut Serve down.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # If the launcher itself is killed (SIGKILL, OOM), the kernel kills serve run, and Ray's
    # processes, which share serve run's fate the same way, follow it.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ServeProcess:
    """One `serve run`, and every process of the session it leads."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str]) -> None:
        self._argv = list(argv)
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self._argv, env=self._env, start_new_session=True, preexec_fn=_child_setup
        )

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def session(self) -> list[psutil.Process]:
        """The processes still in the child's session (serve run, Ray's daemons and workers)."""
        if self._proc is None:
            return []
        members = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) != self._proc.pid:
                    continue
                proc = psutil.Process(pid)
                # A zombie is already dead; whoever adopted it reaps it.
                if proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return members

    def stop(
        self, *, grace_s: float, abort: threading.Event | None = None, kill_wait_s: float = 10.0
    ) -> bool:
        """SIGINT to serve run (it shuts Serve down, then its Ray), SIGKILL what is left.

        Returns True when serve run finished within `grace_s` (or before `abort` was set) on
        its own. Either way, when this returns no process of the session is left, unless it
        outlived `kill_wait_s` more.
        """
        if self._proc is None:
            return True
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while self._proc.poll() is None and time.monotonic() < deadline:
            if abort is not None and abort.is_set():
                break
            time.sleep(0.1)
        graceful = self._proc.poll() is not None
        # serve run's atexit ray.shutdown() stops Ray's daemons; workers and agents notice the
        # raylet is gone a moment later. Let them, briefly, before taking over.
        settle = time.monotonic() + (2.0 if graceful else 0.0)
        while self.session() and time.monotonic() < settle:
            time.sleep(0.1)
        self.kill(wait_s=kill_wait_s)
        return graceful

    def kill(self, *, wait_s: float = 10.0) -> None:
        """SIGKILL every process of the session and reap serve run."""
        deadline = time.monotonic() + wait_s
        while True:
            members = self.session()
            for proc in members:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.5)
            if not members or time.monotonic() > deadline:
                return
            psutil.wait_procs(members, timeout=1.0)
