"""What a person sees in the terminal while a job runs, and where the rest goes.

The console shows one progress bar for the run (redrawn in place on a TTY), one line per
epoch (printed once, by rank 0), rayrec's own messages and errors. Everything else (Ray's
start-up notices, raylet and core-worker warnings, Ray Data banners, worker logs, library
dumps) goes to ``rayrec.log`` in the run folder, and the last line says where it is.
``--verbose`` puts it all back on the console.

Workers talk to the driver's console through their stdout, which Ray forwards to the
driver: a line starting with ``MAGIC`` carries one JSON event (the way ``tqdm_ray`` does
it). In a process that has the console (``--local`` runs), events are handled directly.

Events: ``{"ev": "start", "total": steps, "initial": done, "epochs": E}``,
``{"ev": "step", "done": n, "epoch": e, "desc": text}``, ``{"ev": "epoch", "metrics": {...}}``
and ``{"ev": "end"}`` (rank 0's loop returned: the driver waits for it, so that no epoch line
arrives after the final table).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

from rayrec.stopping import Stopped

MAGIC = "\x1erayrec-console:"
LOG_FILE = "rayrec.log"
#: Ray's handler of forwarded worker output in the driver (``ray._private.worker``).
RAY_PRINT_HANDLER = "ray_print_logs"
#: Seconds between two progress events a worker sends (each is a line through Ray's log stream).
PROGRESS_EVERY_S = 0.5

_active: Console | None = None  # the console of this process, while a job runs here
_to_driver = False  # a worker whose driver shows a console: events go out through stdout
_sent = 0  # events this worker sent
_SOURCE = f"{socket.gethostname()}:{os.getpid()}"  # unique across the nodes of a cluster


# ----------------------------------------------------------------------------- worker side


def send_to_driver(enabled: bool = True) -> None:
    """In a Ray worker: send console events to the driver (it shows a console for this run)."""
    global _to_driver
    _to_driver = enabled


def emit(event: dict[str, Any]) -> None:
    """Send ``event`` to the job's console: directly where it runs, through stdout from a worker,
    nowhere when there is none (a sweep trial, a test calling a loop)."""
    global _sent
    if _active is not None:
        _active.handle(event)
    elif _to_driver:
        _sent += 1  # numbered per process: Ray may forward a worker's line twice (its log files overlap)
        print(MAGIC + json.dumps({**event, "src": _SOURCE, "seq": _sent}, default=float), flush=True)


class Progress:
    """Wraps a worker's batch iterator and sends progress events (rank 0 only).

    ``total`` optimizer micro-batches over the run; ``initial`` those already done (a resumed
    run). Called as ``progress(batches, epoch)`` or ``progress(batches, epoch, describe)``
    where ``describe()`` is a short status (the joint model's stage and trained module).
    """

    def __init__(self, total: int, epochs: int, initial: int = 0, send: Callable[[dict], None] = emit) -> None:
        self.done, self.epochs, self.send = initial, epochs, send
        self._last = 0.0
        send({"ev": "start", "total": total, "initial": initial, "epochs": epochs})

    def __call__(self, it: Iterable, epoch: int, describe: Callable[[], str] | None = None) -> Iterator:
        for x in it:
            yield x
            self.update(self.done + 1, epoch, describe)

    def update(self, done: int, epoch: int, describe: Callable[[], str] | None = None) -> None:
        """``done`` units so far, in ``epoch``; sent at most every ``PROGRESS_EVERY_S``."""
        self.done = done
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.send({"ev": "step", "done": done, "epoch": epoch, "desc": describe() if describe else ""})


def report_epoch(metrics: dict[str, Any]) -> None:
    """Rank 0's end-of-epoch (or final test) metrics: one console line."""
    emit({"ev": "epoch", "metrics": {k: float(v) for k, v in metrics.items() if _number(v)}})


def say(text: str) -> None:
    """A line for the person at the terminal from driver-side code (e.g. a sweep's trial results);
    plain ``print`` when no job console is active."""
    if _active is not None:
        _active.line(text)
    else:
        print(text, flush=True)


def report_end() -> None:
    """Rank 0's training loop has returned."""
    emit({"ev": "end"})


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- driver side


class Console:
    """Renders events: a tqdm bar on a TTY, else nothing but one plain line per epoch.

    ``keys``: the metrics shown in an epoch line (missing ones are skipped); ``log``: where
    each line is also written (the run's log file). Thread-safe: Ray's log thread delivers
    worker events while the main thread prints.
    """

    def __init__(self, keys: list[str], out: TextIO | None = None, tty: bool | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.keys, self.log = keys, log or (lambda line: None)
        self.bar = None
        self.epochs = 0
        self._t0 = time.monotonic()
        self._lock = threading.RLock()
        self.ended = threading.Event()  # rank 0 sent "end"
        self.log_path: Path | None = None  # the run's log file (set by ``job_console``)
        self.attach_ray: Callable[[], None] = lambda: None  # take over Ray's worker output (once Ray is up)

    def handle(self, event: dict[str, Any]) -> None:
        with self._lock:
            kind = event.get("ev")
            if kind == "start":
                self._start(int(event["total"]), int(event.get("initial", 0)), int(event.get("epochs", 0)))
            elif kind == "step" and self.bar is not None:
                self.bar.n = min(int(event["done"]), self.bar.total or int(event["done"]))
                desc = f"epoch {event['epoch']}/{self.epochs}" + (f" {event['desc']}" if event.get("desc") else "")
                self.bar.set_description_str(desc, refresh=False)
                self.bar.refresh()
            elif kind == "epoch":
                self.line(self.epoch_line(event["metrics"]))
            elif kind == "end":
                self.ended.set()

    def wait_end(self, timeout: float = 10.0) -> None:
        """Wait (a little) for rank 0's last lines, which Ray forwards with a delay."""
        self.ended.wait(timeout)

    def _start(self, total: int, initial: int, epochs: int) -> None:
        self.epochs = epochs
        if self.bar is not None or not self.tty:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, file=self.out, dynamic_ncols=True, unit="step",
                        desc=f"epoch 1/{epochs}", leave=False)

    def epoch_line(self, metrics: dict[str, float]) -> str:
        """``epoch 3/12  train/loss 5.1234  val/ndcg@10 0.1234 ...  (41 s)``; the test report says ``test``."""
        if any(k.startswith("test/") for k in metrics):
            head, keys = "test (best epoch {:g})".format(metrics.get("best_epoch", 0)), [
                k.replace("val/", "test/") for k in self.keys if k.startswith("val/")]
        elif "at_step" in metrics:  # a step-based run's checkpoint (GRPO)
            head, keys = f"step {int(metrics['at_step'])}/{int(metrics.get('max_steps', 0))}", self.keys
        else:
            epoch = int(metrics.get("epoch", 0))
            head, keys = f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}", self.keys
            for part in ("stage", "phase"):
                if part in metrics:
                    head += f" ({part} {int(metrics[part])})"
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
        if metrics.get("health/skipped_steps"):
            shown += f"  skipped {int(metrics['health/skipped_steps'])} NaN/Inf steps"
        return f"{head}  {shown}  ({time.monotonic() - self._t0:.0f} s)"

    def line(self, text: str) -> None:
        """Print above the bar (or plainly) on the terminal, and into the log."""
        with self._lock:
            self.log(text)
            if self.bar is not None:
                self.bar.write(text, file=self.out)
            else:
                print(text, file=self.out, flush=True)

    def close(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def around(self, emit):
        """``emit`` (a console log handler's) with the bar cleared first and drawn again after, so a
        log line (a phase or stage boundary) is its own line, not glued to the bar's."""

        def wrapped(record: logging.LogRecord) -> None:
            with self._lock:
                if self.bar is not None:
                    self.bar.clear()
                try:
                    emit(record)
                finally:
                    if self.bar is not None:
                        self.bar.refresh()

        return wrapped


#: Loggers whose errors rayrec says itself in one line, so they go to the log file only: Tune's controller
#: logs each trial failure with its traceback; the sweep's recorder says "trial X failed: ..." or "lost ...,
#: started again".
SAID_BY_RAYREC = ("ray.tune.execution.tune_controller",)


def _to_console(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and not record.name.startswith(SAID_BY_RAYREC)


class _ConsoleFilter(logging.Filter):
    """What reaches the console without ``--verbose``: rayrec's own INFO and up, anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("rayrec") or _to_console(record)


class _ToFile(logging.Filter):
    """On a library's own log handler: the record goes to the run log, and (errors only) to the
    console's handlers, never through the library's handler itself."""

    def __init__(self, file: logging.Handler, console: list[logging.Handler]) -> None:
        super().__init__()
        self.file, self.console = file, console

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.file.level:
            self.file.handle(record)
        if _to_console(record):
            for h in self.console:
                h.handle(record)
        return False


@contextmanager
def job_console(folder: Path | None, keys: list[str], *, verbose: bool = False,
                enabled: bool = True) -> Iterator[Console | None]:
    """The console of one job run in this process, its noise kept in ``folder/rayrec.log``.

    Disabled (a sweep trial: the sweep's driver owns the console) it yields None and changes
    nothing. Ray's forwarded worker output is taken over once Ray is up (``console.attach_ray``).
    When the run fails, the log's path is printed before the error propagates.
    """
    global _active
    if not enabled or folder is None:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    tty = sys.stdout.isatty()
    with ExitStack() as stack:
        file = logging.FileHandler(path, encoding="utf-8")
        stack.callback(file.close)
        file.setLevel(logging.DEBUG if verbose else logging.INFO)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        routing = stack.enter_context(_Routing(file, verbose))
        console = Console(keys, out=routing.out, tty=tty, log=lambda line: _write(file, line))
        console.log_path = path
        for h in routing.console:
            h.emit = console.around(h.emit)
            stack.callback(delattr, h, "emit")
        previous, _active = _active, console

        def restore_active() -> None:
            global _active
            _active = previous

        stack.callback(restore_active)
        stack.callback(console.close)  # after the Ray hook is detached (callbacks run in reverse)
        ray_hook = _RayOutput(file, console, verbose)
        stack.callback(ray_hook.detach)

        def attach_ray() -> None:
            import ray.data  # noqa: F401  (Ray Data sets up its loggers on import: route them too)

            ray_hook.attach()
            routing.rescan()

        console.attach_ray = attach_ray
        try:
            yield console
        except BaseException as e:
            stack.close()
            if not isinstance(e, Stopped):  # a stopped run's one line says where it stands
                print(f"log: {path} (Ray and worker output of the failed run)", file=sys.stderr, flush=True)
            raise


def _write(file: logging.Handler, text: str) -> None:
    file.handle(logging.LogRecord("rayrec.console", logging.INFO, "", 0, text, None, None))


class _Routing:
    """While a job runs: every log record to the run's file; on the console only rayrec's own
    (``_ConsoleFilter``) and anyone's errors; libraries' own handlers ("ray", "ray.data",
    "mlflow", ...) and whatever else writes to standard output or error (Ray's C++ core worker,
    progress bars, banners) into the file. Each change is undone on exit, also after a failure
    half-way in. ``verbose`` leaves the console as it was and only adds the file."""

    def __init__(self, file: logging.Handler, verbose: bool) -> None:
        self.file, self.verbose = file, verbose
        self.root = logging.getLogger()
        self.out: TextIO | None = None  # the terminal's standard output, while the streams go to the log
        self.console: list[logging.Handler] = []  # the root's handlers to the terminal
        self.stack = ExitStack()

    def __enter__(self) -> _Routing:
        try:
            self._route(self.stack)
        except BaseException:
            self.stack.close()
            raise
        return self

    def _route(self, stack: ExitStack) -> None:
        root, file = self.root, self.file
        old_level = root.level
        root.setLevel(min(old_level or logging.WARNING, file.level))  # the file gets INFO (``verbose``: DEBUG)
        stack.callback(root.setLevel, old_level)
        root.addHandler(file)
        stack.callback(root.removeHandler, file)
        was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
        logging.captureWarnings(True)
        stack.callback(logging.captureWarnings, was_capturing)
        if self.verbose:
            return
        self.console = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler)]
        for h in self.console:
            self._filter(stack, h, _ConsoleFilter())
            if h.level == logging.NOTSET:
                h.setLevel(logging.INFO)
                stack.callback(h.setLevel, logging.NOTSET)
        self._streams_to_log(stack)
        self.rescan()

    def __exit__(self, *exc) -> None:
        self.stack.close()

    @staticmethod
    def _filter(stack: ExitStack, handler: logging.Handler, f: logging.Filter) -> None:
        handler.addFilter(f)
        stack.callback(handler.removeFilter, f)

    def rescan(self) -> None:
        """Route the handlers libraries attached to their own loggers since (e.g. by importing Ray Data)."""
        if self.verbose:
            return
        for h in self._library_handlers():
            if not any(isinstance(f, _ToFile) for f in h.filters):
                self._filter(self.stack, h, _ToFile(self.file, self.console))

    def _library_handlers(self) -> list[logging.Handler]:
        """Handlers on non-propagating library loggers; their own log files stay as they are."""
        found: list[logging.Handler] = []
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and not name.startswith("rayrec"):
                found += [h for h in logger.handlers if h not in self.root.handlers and h not in found
                          and not isinstance(h, logging.FileHandler)]
        return found

    def _streams_to_log(self, stack: ExitStack) -> None:
        """Standard output and error into the log file: what native code (Ray's core worker) and
        libraries (progress bars, import-time banners, their own log handlers) write there lands in
        the file. Only the console keeps the terminal: its log handlers, and ``self.out`` (a copy
        of standard output) for the progress bar and rayrec's lines."""
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
                if stream.fileno() != fd:
                    return
            except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): leave them
                return
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        stack.callback(_restore_fds, saved)
        log_fd = os.open(self.file.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for fd in (1, 2):
            os.dup2(log_fd, fd)
        os.close(log_fd)
        self.out = stack.enter_context(os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8",
                                                 errors="replace"))
        err = stack.enter_context(os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace"))
        for h in self.console:
            stack.callback(h.setStream, h.stream)
            h.setStream(err)


def _restore_fds(saved: dict[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)


class _AfterRun:
    """Ray's printer of forwarded worker output once a run's console has closed (see ``_RayOutput.detach``):
    for ``GRACE_S`` what workers still send (a stopped or failed run's shutdown) goes to the run's log;
    later output (other Ray work of this process) is Ray's to print again. Console events are dropped."""

    GRACE_S = 30.0

    def __init__(self, original: Callable | None, log_path: str, verbose: bool) -> None:
        self.original = getattr(original, "original", original)  # never a chain of these
        self.log_path, self.verbose = log_path, verbose
        self.until = time.monotonic() + self.GRACE_S

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [ln for ln in data.get("lines", []) if not ln.startswith(MAGIC)]
        if not lines:
            return
        if time.monotonic() > self.until:
            if self.original is not None:
                self.original({**data, "lines": lines})
            return
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.writelines(f"({data.get('pid')}) {ln}\n" for ln in lines)
        except OSError:
            pass
        if self.verbose and self.original is not None:
            self.original({**data, "lines": lines})


class _RayOutput:
    """Takes over the driver's printing of forwarded worker output while a job runs.

    Console events are decoded and shown; every other line goes to the log file (and, with
    ``--verbose``, also to Ray's own printer). Uses Ray's stream dispatcher, the hook Ray's
    own ``log_to_driver`` printing is registered on; on a Ray without it, output stays as Ray
    prints it. (Ray's direct printer of raylet errors writes to standard output, which the
    routing above has sent to the log.)
    """

    def __init__(self, file: logging.Handler, console: Console, verbose: bool) -> None:
        self.file, self.console, self.verbose = file, console, verbose
        self.original: Callable | None = None
        self.dispatcher = None
        self.last: dict[str, int] = {}  # event source -> its newest sequence number shown

    def attach(self) -> None:
        if self.dispatcher is not None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        with dispatcher._lock:
            for i, (name, handler) in enumerate(dispatcher.handlers):
                if name == RAY_PRINT_HANDLER:
                    self.original, self.dispatcher = handler, dispatcher
                    dispatcher.handlers[i] = (name, self.handle)
                    break

    def detach(self) -> None:
        """Give Ray its printer back, behind a filter: what workers still send after the run (a stopped or
        failed run's shutdown) goes to the run's log file, not the terminal, and console events, which mean
        nothing without a console, are dropped. Waits for a delivery in progress (the dispatcher's lock)."""
        if self.dispatcher is None:
            return
        after = _AfterRun(self.original, self.file.baseFilename, self.verbose)
        with self.dispatcher._lock:
            self.dispatcher.handlers = [(n, after if h == self.handle else h) for n, h in self.dispatcher.handlers]
        self.dispatcher = None

    def handle(self, data: dict[str, Any]) -> None:
        try:
            self._handle(data)
        except Exception as e:  # an error here would end Ray's log thread for the whole process
            _write(self.file, f"(console) could not show worker output: {type(e).__name__}: {e}")

    def _handle(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        pid = data.get("pid")
        prefix = f"({who} pid={pid}) " if who else f"({pid}) "
        lines = data.get("lines", [])
        if pid == "autoscaler":  # Ray prints only its events, not the periodic status dump
            lines = list(_autoscaler_events(lines))
        rest = []
        for line in lines:
            if line.startswith(MAGIC):
                self._event(line[len(MAGIC):], prefix)
                continue
            _write(self.file, prefix + line)
            rest.append(line)
        if self.verbose and rest and self.original is not None:
            self.original({**data, "lines": rest})

    def _event(self, text: str, prefix: str) -> None:
        """Show one event once: Ray may forward a worker's line twice (its log files overlap)."""
        try:
            event = json.loads(text)
        except ValueError:
            _write(self.file, prefix + MAGIC + text)
            return
        source, seq = event.pop("src", ""), int(event.pop("seq", 0))
        if seq and seq <= self.last.get(source, 0):
            return
        self.last[source] = seq
        self.console.handle(event)


def _autoscaler_events(lines: list[str]):
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return iter(lines)
    return filter_autoscaler_events(lines)
