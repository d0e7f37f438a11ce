"""Checkpointing SQLite's write-ahead log off the request path.

In WAL mode SQLite appends each commit to ``audit.db-wal``; a *checkpoint* copies those
pages back into ``audit.db`` and fsyncs it. By default the commit that takes the log past
1000 pages runs that checkpoint itself, so one request in every ~400 (an audit record is
~10 kB) waited for megabytes to be copied and synced: measured as the p99 of ``/recommend``
under load (docs/serving.md). The audit store turns that off (``PRAGMA wal_autocheckpoint=0``)
and asks this module instead: one daemon thread per process checkpoints every SQLite store
that was written since its last pass, about once a second, in ``PASSIVE`` mode, which never
blocks a writer (commits go on appending while pages are copied). Durability is unchanged:
a commit is on disk when it returns (``synchronous=FULL``), in the log until it is copied.

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

INTERVAL_S = 1.0  # how often a written store is checkpointed


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
        self.passes = 0  # checkpoints run (for tests and diagnostics)

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
                self.passes += 1
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
