"""Stopping a run on a signal, as schedulers send them (SIGTERM, SIGHUP) and people do (SIGINT).

``on_signals`` holds the handlers while a run trains. A run in this process stops at the next
optimizer-step boundary (the loops call ``check``): nothing is half-written, and a re-run resumes
from the newest complete checkpoint. A second signal stops at once. A run on Ray stops at once:
its workers are other processes, and Ray Train's abort ends them (a checkpoint counts only once
Ray has registered it, so none is half-written either). Either way ``Stopped`` is raised in the
main thread; the driver marks the MLflow run KILLED and says how to resume.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_requested: int | None = None
received: int | None = None  # the last signal handled (Ray may turn ``Stopped`` into a plain KeyboardInterrupt)


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (a ``KeyboardInterrupt``, so ``except Exception`` never swallows it)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def check() -> None:
    """Raise ``Stopped`` when a signal asked this run to stop (call it at a step boundary)."""
    if _requested is not None:
        raise Stopped(_requested)


@contextmanager
def on_signals(*, at_step_boundary: bool) -> Iterator[None]:
    """Handle SIGTERM/SIGHUP/SIGINT for the block (main thread only; elsewhere a no-op)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        global _requested, received
        received = signum
        name = signal.Signals(signum).name
        if at_step_boundary and _requested is None:
            _requested = signum
            log.warning("%s: stopping at the next step boundary (send it again to stop at once)", name)
            return
        raise Stopped(signum)

    global received
    before = {s: signal.getsignal(s) for s in SIGNALS}
    _requested = received = None
    for s in SIGNALS:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        _requested = None


def as_stopped(e: BaseException) -> Stopped | None:
    """``e`` as a ``Stopped``, when a handled signal caused it (else None)."""
    if isinstance(e, Stopped):
        return e
    if isinstance(e, KeyboardInterrupt) and received is not None:
        return Stopped(received)
    return None
