"""A JSONL cache of completions keyed by a hash of (backend, model, settings, prompt).

Each successful completion is appended (and flushed) as soon as it arrives, so an
interrupted run resumes without paying twice. A torn last line from a killed process
is skipped on load, and the next append starts on a fresh line, so it is never glued to it. Only prompt hashes, texts and token counts are stored: no keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class PromptCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable cache line skipped (interrupted write?)", self.path, n)

    @staticmethod
    def key(backend: str, model: str, settings: dict[str, Any], payload: str) -> str:
        head = json.dumps({"backend": backend, "model": model, **settings}, sort_keys=True)
        return hashlib.sha256(f"{head}\n{payload}".encode()).hexdigest()

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, **row}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                if f.tell() and not self._ends_with_newline():  # a torn line of a killed writer stays alone
                    f.write(b"\n")
                f.write((json.dumps(row) + "\n").encode("utf-8"))
                f.flush()
            self.entries[key] = row
