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
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

MAGIC = "\x1erayrec-console:"
LOG_FILE = "rayrec.log"
#: Ray's handler of forwarded worker output in the driver (``ray._private.worker``).
RAY_PRINT_HANDLER = "ray_print_logs"
#: Seconds between two progress events a worker sends (each is a line through Ray's log stream).
PROGRESS_EVERY_S = 0.5

_active: Console | None = None  # the console of this process, while a job runs here
_to_driver = False  # a worker whose driver shows a console: events go out through stdout


# ----------------------------------------------------------------------------- worker side


def send_to_driver(enabled: bool = True) -> None:
    """In a Ray worker: send console events to the driver (it shows a console for this run)."""
    global _to_driver
    _to_driver = enabled


def emit(event: dict[str, Any]) -> None:
    """Send ``event`` to the job's console: directly where it runs, through stdout from a worker,
    nowhere when there is none (a sweep trial, a test calling a loop)."""
    if _active is not None:
        _active.handle(event)
    elif _to_driver:
        print(MAGIC + json.dumps(event, default=float), flush=True)


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


def report_end() -> None:
    """Rank 0's training loop has returned."""
    emit({"ev": "end"})


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- driver side


class Console:
    """Renders events: a tqdm bar on a TTY, else nothing but one plain line per epoch.

    ``keys``: the metrics shown in an epoch line (missing ones are skipped); ``log``: where
    each epoch line is also written (the run's log file).
    """

    def __init__(self, keys: list[str], out: TextIO | None = None, tty: bool | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.keys, self.log = keys, log or (lambda line: None)
        self.bar = None
        self.epochs = 0
        self._t0 = time.monotonic()
        self.ended = threading.Event()  # rank 0 sent "end"
        self.log_path: Path | None = None  # the run's log file (set by ``job_console``)
        self.attach_ray: Callable[[], None] = lambda: None  # take over Ray's worker output (once Ray is up)

    def handle(self, event: dict[str, Any]) -> None:
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
        else:
            epoch = int(metrics.get("epoch", 0))
            head, keys = f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}", self.keys
            if "stage" in metrics:
                head += f" (stage {int(metrics['stage'])})"
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
        return f"{head}  {shown}  ({time.monotonic() - self._t0:.0f} s)"

    def line(self, text: str) -> None:
        """Print above the bar (or plainly), and into the log."""
        self.log(text)
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _ConsoleFilter(logging.Filter):
    """What reaches the console without ``--verbose``: rayrec's own INFO and up, anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("rayrec") or record.levelno >= logging.ERROR


class _ToFile(logging.Filter):
    """On Ray's own log handler: the record goes to the run log instead of the console."""

    def __init__(self, file: logging.Handler, verbose: bool) -> None:
        super().__init__()
        self.file, self.verbose = file, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.file.level:
            self.file.handle(record)
        return self.verbose or record.levelno >= logging.ERROR


@contextmanager
def job_console(folder: Path | None, keys: list[str], *, verbose: bool = False,
                enabled: bool = True) -> Iterator[Console | None]:
    """The console of one job run in this process, its noise kept in ``folder/rayrec.log``.

    Disabled (a sweep trial: the sweep's driver owns the console) it yields None and changes
    nothing. Ray's forwarded worker output is taken over while Ray is up (see ``attach_ray``).
    """
    global _active
    if not enabled or folder is None:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    file = logging.FileHandler(path, encoding="utf-8")
    file.setLevel(logging.DEBUG if verbose else logging.INFO)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = Console(keys, log=lambda line: _write(file, line))
    console.log_path = path
    restore = _route_logging(file, verbose)
    previous, _active = _active, console
    ray_hook = _RayOutput(file, console, verbose)
    console.attach_ray = ray_hook.attach
    try:
        yield console
    finally:
        console.close()
        ray_hook.detach()
        _active = previous
        restore()
        file.close()


def _write(file: logging.Handler, text: str) -> None:
    file.handle(logging.LogRecord("rayrec.console", logging.INFO, "", 0, text, None, None))


def _route_logging(file: logging.Handler, verbose: bool) -> Callable[[], None]:
    """Root logger: everything to the file; the console handler filtered. Returns the undo."""
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(min(old_level or logging.WARNING, file.level))  # the file gets INFO (``verbose``: DEBUG)
    root.addHandler(file)
    filters = []
    for h in root.handlers:
        if h is not file and not verbose and isinstance(h, logging.StreamHandler):
            f = _ConsoleFilter()
            h.addFilter(f)
            filters.append((h, f))
            if h.level == logging.NOTSET:
                h.setLevel(logging.INFO)
                filters.append((h, None))
    for h in _ray_handlers(exclude=set(root.handlers)):
        f = _ToFile(file, verbose)
        h.addFilter(f)
        filters.append((h, f))
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        for h, f in filters:
            if f is None:
                h.setLevel(logging.NOTSET)
            else:
                h.removeFilter(f)
        root.removeHandler(file)
        root.setLevel(old_level)

    return undo


def _ray_handlers(exclude: set[logging.Handler]) -> list[logging.Handler]:
    """Handlers Ray attached to its own loggers ("ray", and e.g. "ray.data", which do not propagate)."""
    found: list[logging.Handler] = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "ray" or name.startswith("ray.")):
            found += [h for h in logger.handlers if h not in exclude and h not in found
                      and not isinstance(h, logging.FileHandler)]  # Ray's own log files stay as they are
    return found


class _RayOutput:
    """Takes over the driver's printing of forwarded worker output while a job runs.

    Console events are decoded and shown; every other line goes to the log file (and, with
    ``--verbose``, also to Ray's own printer). Uses Ray's stream dispatcher, the hook Ray's
    own ``log_to_driver`` printing is registered on; on a Ray without it, output stays as Ray prints it.
    """

    def __init__(self, file: logging.Handler, console: Console, verbose: bool) -> None:
        self.file, self.console, self.verbose = file, console, verbose
        self.original: Callable | None = None
        self.dispatcher = None

    def attach(self) -> None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        with dispatcher._lock:
            for i, (name, handler) in enumerate(dispatcher.handlers):
                if name == RAY_PRINT_HANDLER and self.dispatcher is None:
                    self.original, self.dispatcher = handler, dispatcher
                    dispatcher.handlers[i] = (name, self.handle)

    def detach(self) -> None:
        if self.dispatcher is None:
            return
        with self.dispatcher._lock:
            self.dispatcher.handlers = [(n, self.original if h == self.handle else h)
                                        for n, h in self.dispatcher.handlers]
        self.dispatcher = None

    def handle(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}) " if who else f"({data.get('pid')}) "
        rest = []
        for line in data.get("lines", []):
            if line.startswith(MAGIC):
                try:
                    self.console.handle(json.loads(line[len(MAGIC):]))
                except (ValueError, KeyError):
                    _write(self.file, prefix + line)
                continue
            _write(self.file, prefix + line)
            rest.append(line)
        if self.verbose and rest and self.original is not None:
            self.original({**data, "lines": rest})
