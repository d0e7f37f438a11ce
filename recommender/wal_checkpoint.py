"""Checkpointing SQLite's write-ahead log mostly off the request path.

In WAL mode SQLite appends each commit to ``audit.db-wal``; a *checkpoint* copies those
pages back into ``audit.db`` and fsyncs it. SQLite runs one automatically inside the commit
that takes the log past 1000 pages, and alone that commit copied and synced ~4 MB (an audit
record is ~10 kB, so one request in ~400): measured as the p99 of ``/recommend`` under load
(bench/results/servers.md).

The automatic checkpoint must stay, though: only a checkpoint that finds no newer frames can
let the log start again from its beginning, and under a steady stream of commits a
checkpoint running beside the writer almost never does (the log grew past 100 MB in a
benchmark when it was turned off). So both run: one daemon thread per process checkpoints
every written SQLite store four times a second in ``PASSIVE`` mode, which never blocks a
writer, and copies nearly all pages off the request path; the automatic checkpoint in the
1000-page commit then has only what arrived since that pass to copy, and restarts the log.
Durability is unchanged: a commit is on disk when it returns (``synchronous=FULL``), in the
log until it is copied.

If the process dies, nothing is lost: the next connection to the database finds the log and
the next checkpoint copies it; SQLite also checkpoints when the last connection closes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

log = logging.getLogger(__name__)

INTERVAL_S = 0.25  # how often a written store is checkpointed


class Checkpointable(Protocol):
    def checkpoint(self) -> tuple[int, int, int]: ...


class WalCheckpointer:
    """A daemon thread that checkpoints the stores :meth:`written` names, once per
    ``interval`` seconds; started on first use and again after a fork."""

    def __init__(self, interval: float = INTERVAL_S):
        self.interval = interval
        self._dirty: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def written(self, store: Checkpointable) -> None:
        """Note that ``store`` committed; it is checkpointed on the next pass."""
        with self._lock:
            self._dirty.add(store)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="painplan-wal-checkpoint", daemon=True
                )
                self._thread.start()

    def forget(self, store: Checkpointable) -> None:
        """Stop checkpointing ``store`` (it is being closed)."""
        with self._lock:
            self._dirty.discard(store)

    def flush(self) -> None:
        """Checkpoint every written store now, in the calling thread."""
        with self._lock:
            stores = list(self._dirty)
            self._dirty.clear()
        for store in stores:
            try:
                busy, frames, copied = store.checkpoint()
                if busy or copied < frames:  # a reader holds older pages; next pass
                    with self._lock:
                        self._dirty.add(store)
            except Exception as err:  # noqa: BLE001 - keep checkpointing the others
                log.warning("audit store WAL checkpoint failed (retrying): %s", err)
                with self._lock:
                    self._dirty.add(store)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()


CHECKPOINTER = WalCheckpointer()
