"""Output folders that are replaced whole or not at all, by one writer at a time.

A writer (``rayrec data prepare``, the feature cache) builds its output in a temporary
folder beside it, then ``replace_folder`` swaps it in: the old folder is renamed aside,
the new one renamed in, and only then the old one deleted. A failure between the two
renames puts the old folder back. ``output_lock`` serialises writers of one output: a
second one fails at once with a clear message instead of silently replacing the first
one's result. Leftovers of a writer killed with -9 (its temporary folder, an old folder
set aside) carry names only this module makes; the next writer, holding the lock, clears
them, and puts a set-aside folder back when the output itself is missing.

Single files (a checkpoint, an index, a result table) go through ``atomic_path`` /
``atomic_write``: written under a temporary name beside the file, flushed to disk, then
renamed over it, so a reader sees the old file or the new one, never half of one.

``check_target`` is what every writer asks first: is ``out`` a folder this tool may
replace? Never the input it reads (or a folder holding it), never a file, and, with
``overwrite``, only a folder that carries the writer's marker file (its manifest).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rayrec.errors import DataError

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; when the block ends without an error its bytes
    are flushed to disk (fsync) and it is renamed over ``path``; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
        _rename(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on the disk of {path} ({_free(path.parent)} free there); nothing "
                                "was written under that name. Free space, or move the output "
                                "(run.storage_path, data.path) to a larger disk") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


TMP_PREFIX, TMP_INFIX = ".", ".tmp-"  # ``.NAME.tmp-PID``: what ``atomic_path`` writes before the rename


class DiskFullError(DataError):
    """A write failed for lack of space (the message names the file and the free space)."""


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB"
    except OSError:
        return "unknown"


def clear_stale_temporaries(folder: Path) -> list[Path]:
    """Remove ``atomic_path`` temporaries under ``folder`` whose writer (the PID in the name) is gone
    (a writer killed with -9, or a host that crashed); returns those removed. Call it only where
    writers are this host's processes (a run folder its owner holds)."""
    removed = []
    for p in Path(folder).rglob(f"{TMP_PREFIX}*{TMP_INFIX}*"):
        pid = p.name.rsplit(TMP_INFIX, 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_file():
            log.warning("removing %s, left by an interrupted writer (PID %s)", p, pid)
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (``atomic_path``); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)

_rename = os.replace  # one name for the swap's renames, so tests can fail one


def _names(out: Path) -> tuple[str, str, str]:
    """(lock file, temporary-folder prefix, set-aside prefix) of an output, all hidden beside it."""
    return f".{out.name}.lock", f".{out.name}.tmp-", f".{out.name}.old-"


def check_target(out: Path, *, overwrite: bool, marker: str, protect: Iterable[Path] = (), flag: str = "--overwrite"
                 ) -> None:
    """Fail unless ``out`` may be written: not an input (nor a folder above one), not a file, and when it
    exists, ``overwrite`` set and ``out/marker`` present (so it is one of ours)."""
    target = out.resolve()
    for p in protect:
        p = Path(p).expanduser().resolve()
        if target == p or target in p.parents:
            raise DataError(f"{out} is the input folder or holds it ({p}); write the output elsewhere")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise DataError(f"{out} is a file, not an output folder; choose a folder path")
    if not out.exists():
        return
    if not overwrite:
        raise DataError(f"{out} already exists; pass {flag} to replace it")
    if not (out / marker).is_file():
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") if held else "nothing"
        raise DataError(f"{out} holds no {marker}, so it is not an output of rayrec; refusing to replace it "
                        f"(it holds: {shown}); choose another folder")


@contextmanager
def output_lock(out: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the writer's lock of ``out`` (``.NAME.lock`` beside it) for the block; fail if another
    process holds it (``wait``: wait for it, for writers that then find the work done, like the
    feature cache). The kernel drops the lock of a killed process, so a crash never wedges it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / _names(out)[0]
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if wait and _busy(fd):
                log.info("waiting for another process writing %s", out)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"another process is writing {out} (it holds {path}); wait for it to finish, or write "
                            "to another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file that its last holder removed while we opened it
            break
        os.close(fd)
    try:
        _clear_leftovers(out)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _busy(fd: int) -> bool:
    """Whether another process holds the lock (then it is left untaken)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _clear_leftovers(out: Path) -> None:
    """Under the lock, nobody else is writing: temporary folders are a dead writer's; a set-aside
    folder goes back when the output is missing (killed between the swap's renames), else away."""
    _, tmp_prefix, old_prefix = _names(out)
    for p in out.parent.glob(f"{tmp_prefix}*"):
        log.warning("removing %s, left by an interrupted writer of %s", p, out)
        shutil.rmtree(p, ignore_errors=True)
    old = sorted(out.parent.glob(f"{old_prefix}*"), key=lambda p: p.stat().st_mtime)
    if old and not out.exists():
        log.warning("%s was missing: putting back %s (a writer was interrupted while swapping it)", out, old[-1])
        _rename(old.pop(), out)
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def temp_folder(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so the swap is a rename)."""
    return Path(tempfile.mkdtemp(prefix=_names(out)[1], dir=out.parent))


def replace_folder(tmp: Path, out: Path, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Swap ``tmp`` in as ``out`` (call under ``output_lock``). An ``out`` that exists now is replaced only
    with ``overwrite`` (it may have appeared since the writer checked); it is set aside until the new
    folder is in, and restored if that rename fails."""
    if not out.exists():
        _rename(tmp, out)
        return
    if not overwrite:
        raise DataError(f"{out} already exists (written while this run worked); pass {flag} to replace it")
    aside = out.parent / f"{_names(out)[2]}{os.getpid()}"
    _rename(out, aside)
    try:
        _rename(tmp, out)
    except BaseException:
        _rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
